"""Session-wide fixtures: one local Ray cluster on 127.0.0.1, shared by every test that starts
actors (tests/integration, tests/faults), so the cluster starts once per test session; and one
pool of actors (system.actors.ActorPool) that runs with compatible configs reuse, so most of them
skip the actors' start-up. The session ends by printing how many times the actors were started
(every start-up appends a line to $GRPO_STARTUP_LOG, in subprocesses and job drivers too)."""

from __future__ import annotations

import os
import tempfile

import pytest

_STARTUP_LOG = os.path.join(tempfile.mkdtemp(prefix="grpo-startups-"), "startups")


_BY_TEST: dict[str, tuple[int, int]] = {}


def _startups() -> tuple[int, int]:
    """(start-ups, workers replaced): a start-up is every actor started (`start`) or a new learner
    group for reused actors (`learners`); a replaced worker is one rollout or reference worker."""
    if not os.path.exists(_STARTUP_LOG):
        return 0, 0
    with open(_STARTUP_LOG) as f:
        kinds = [line.split()[0] for line in f if line.strip()]
    return sum(k in ("start", "learners") for k in kinds), kinds.count("worker")


def pytest_configure(config):
    os.environ["GRPO_STARTUP_LOG"] = _STARTUP_LOG


def pytest_collection_modifyitems(items):
    """The tests marked fresh_actors run first in the session (the session's actor pool starts
    for them); within each directory, the tests marked leaves_no_actors (they run another model or
    config, or stop the actors) go last: the others then run one after another on the session's
    actor pool."""
    first_seen: dict = {}
    for item in items:
        first_seen.setdefault(item.path.parent, len(first_seen))
    items.sort(key=lambda item: (item.get_closest_marker("fresh_actors") is None,
                                 first_seen[item.path.parent],
                                 item.get_closest_marker("leaves_no_actors") is not None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _startups()
    try:
        return (yield)
    finally:
        after = _startups()
        if after != before:
            _BY_TEST[item.nodeid] = (after[0] - before[0], after[1] - before[1])


def pytest_terminal_summary(terminalreporter):
    starts, workers = _startups()
    terminalreporter.write_line(f"pipeline start-ups in this session: {starts} (and {workers} "
                                f"rollout/reference workers replaced after runs that lost them)")
    for nodeid, (s, w) in _BY_TEST.items():
        terminalreporter.write_line(f"  {s}  {nodeid}" + (f"  (+{w} workers replaced)" if w else ""))


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    from system.cluster import LOOPBACK_ENV

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ[LOOPBACK_ENV] = "0"  # the node stays on 127.0.0.1, as system/cluster.py keeps its own
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def actor_pool(ray_cluster):
    """Actors kept between the session's runs: a run whose config allows it resets them instead
    of starting its own (replacing first what the run before lost: a killed worker, a dead learner)."""
    from system.actors import ActorPool

    pool = ActorPool()
    yield pool
    pool.close()
