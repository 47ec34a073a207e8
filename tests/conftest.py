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


_BY_TEST: dict[str, int] = {}


def _startups() -> int:
    if not os.path.exists(_STARTUP_LOG):
        return 0
    with open(_STARTUP_LOG) as f:
        return sum(1 for _ in f)


def pytest_configure(config):
    os.environ["GRPO_STARTUP_LOG"] = _STARTUP_LOG


def pytest_collection_modifyitems(items):
    """Within each directory, the tests marked leaves_no_actors (they kill actors, or run another
    model) go last: the others then run one after another on the session's actor pool."""
    first_seen: dict = {}
    for item in items:
        first_seen.setdefault(item.path.parent, len(first_seen))
    items.sort(key=lambda item: (first_seen[item.path.parent],
                                 item.get_closest_marker("leaves_no_actors") is not None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _startups()
    try:
        return (yield)
    finally:
        if _startups() > before:
            _BY_TEST[item.nodeid] = _startups() - before


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"pipeline start-ups in this session: {_startups()}")
    for nodeid, count in _BY_TEST.items():
        terminalreporter.write_line(f"  {count}  {nodeid}")


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
    of starting its own (a run that ends in a failure or a restart leaves fresh ones to the next)."""
    from system.actors import ActorPool

    pool = ActorPool()
    yield pool
    pool.close()
