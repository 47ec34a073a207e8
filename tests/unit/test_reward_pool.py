"""RewardPool: worker processes with a per-sample time limit; failures score 0, are counted, and
never stop scoring; the in-process fast path is cheap; nothing leaks."""

import threading
import time
from pathlib import Path

import pytest

from system.rewards import RewardPool, build_reward

REPO_ROOT = Path(__file__).resolve().parents[2]
MOODY = [{"name": "tests.data.user_rewards:moody_reward", "weight": 1.0}]


@pytest.fixture(scope="module", autouse=True)
def _repo_on_path():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT))  # `tests.data.user_rewards`; spawned workers inherit it
        yield


@pytest.fixture(scope="module")
def moody_pool(_repo_on_path):
    """One pool shared by the failure tests: each must leave it working for the next."""
    with RewardPool(MOODY, num_workers=2, timeout_s=1.0) as pool:
        yield pool


def test_hung_reward_times_out_and_the_pool_recovers(moody_pool):
    start = time.monotonic()
    rewards, metrics = moody_pool.score(["ok", "sleep", "ok", "ok"], ["1"] * 4)
    assert rewards == [1.0, 0.0, 1.0, 1.0]
    assert metrics["reward_timeouts"] == 1 and metrics["reward_errors"] == 0
    assert metrics["reward_worker_restarts"] == 1
    assert time.monotonic() - start < 10  # the sleeper (60 s) was killed, not waited for
    rewards, metrics = moody_pool.score(["ok"] * 6, ["1"] * 6)
    assert rewards == [1.0] * 6
    assert metrics["reward_timeouts"] == 0 and metrics["reward_worker_restarts"] == 0


def test_raising_reward_is_a_counted_error(moody_pool):
    rewards, metrics = moody_pool.score(["boom", "ok", "boom"], ["1"] * 3)
    assert rewards == [0.0, 1.0, 0.0]
    assert metrics["reward_errors"] == 2 and metrics["reward_timeouts"] == 0
    assert metrics["reward_worker_restarts"] == 0  # an exception does not cost the worker


def test_crashed_worker_is_a_counted_error_and_replaced(moody_pool):
    rewards, metrics = moody_pool.score(["crash", "ok", "ok"], ["1"] * 3)
    assert rewards == [0.0, 1.0, 1.0]
    assert metrics["reward_errors"] == 1 and metrics["reward_worker_restarts"] == 1
    assert moody_pool.score(["ok", "ok"], ["1", "1"])[0] == [1.0, 1.0]


def test_every_sample_hangs_on_one_worker():
    with RewardPool(MOODY, num_workers=1, timeout_s=0.5) as pool:
        rewards, metrics = pool.score(["sleep", "sleep", "ok"], ["1"] * 3)
        assert rewards == [0.0, 0.0, 1.0]
        assert metrics["reward_timeouts"] == 2 and metrics["reward_worker_restarts"] == 2


def test_math_in_workers_equals_in_process():
    """math-verify's signal.alarm timeouts work in the workers' main thread: same scores as here."""
    specs = [{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.5}]
    responses = ["\\boxed{\\frac{1}{2}}", "The answer is 0.5.", "#### 3", "\\boxed{5 \\text{ cm}}", "no idea"]
    answers = ["0.5", "1/2", "4", "5", "1"]
    reward = build_reward(specs)
    expected = [reward(r, a)[0] for r, a in zip(responses, answers)]
    assert expected == [1.5, 1.0, 0.0, 1.5, 0.0]
    with RewardPool(specs, num_workers=2, timeout_s=20) as pool:
        rewards, metrics = pool.score(responses, answers)
    assert rewards == expected
    assert metrics["reward_math"] == pytest.approx(3 / 5)
    assert metrics["reward_format"] == pytest.approx(2 / 5)
    assert metrics["reward_errors"] == metrics["reward_timeouts"] == 0


def test_in_process_fast_path_is_cheap_and_counts_errors():
    """num_workers=0 runs in the caller (no time limit): 128 short strings well under 100 ms."""
    with RewardPool([{"name": "exact"}], num_workers=0) as pool:
        responses = [str(i % 7) for i in range(128)]
        answers = [str(i % 5) for i in range(128)]
        pool.score(responses, answers)  # warm the lazy import
        start = time.perf_counter()
        rewards, metrics = pool.score(responses, answers)
        assert time.perf_counter() - start < 0.1
    assert rewards == [1.0 if i % 7 == i % 5 else 0.0 for i in range(128)]
    with RewardPool(MOODY, num_workers=0) as pool:
        rewards, metrics = pool.score(["boom", "ok"], ["1", "1"])
    assert rewards == [0.0, 1.0] and metrics["reward_errors"] == 1


def test_in_process_math_off_the_main_thread():
    out = []
    with RewardPool([{"name": "math"}], num_workers=0) as pool:
        thread = threading.Thread(target=lambda: out.append(pool.score(["\\boxed{2}"], ["2"])[0]))
        thread.start()
        thread.join()
    assert out == [[1.0]]


def test_workers_score_a_step_quickly(moody_pool):
    moody_pool.score(["ok"] * 4, ["1"] * 4)
    start = time.perf_counter()
    rewards, _ = moody_pool.score(["ok"] * 128, ["1"] * 128)
    assert rewards == [1.0] * 128
    assert time.perf_counter() - start < 1.0  # ~10 ms here; generous for a loaded machine


def test_close_stops_every_worker():
    pool = RewardPool(MOODY, num_workers=2, timeout_s=1.0)
    processes = [w.proc for w in pool._workers]
    assert all(p.is_alive() for p in processes)
    pool.score(["sleep", "ok"], ["1", "1"])  # leaves a replacement worker starting
    processes += [w.proc for w in pool._workers]
    pool.close()
    pool.close()  # idempotent
    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["ok"], ["1"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardPool([{"name": "nope"}], num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(MOODY, num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(MOODY, num_workers=0, timeout_s=0)
    with RewardPool(MOODY, num_workers=0) as pool, pytest.raises(ValueError, match="2 responses but 1"):
        pool.score(["a", "b"], ["1"])


def test_reward_the_workers_cannot_import_fails_at_construction(monkeypatch):
    """A reward defined only in the driver's memory builds here but not in a spawned worker."""
    import sys
    import types

    module = types.ModuleType("driver_only_rewards")
    module.one = lambda response, answer: 1.0
    monkeypatch.setitem(sys.modules, "driver_only_rewards", module)
    with pytest.raises(RuntimeError, match="failed to build its rewards"):
        RewardPool([{"name": "driver_only_rewards:one"}], num_workers=1)
    with RewardPool([{"name": "driver_only_rewards:one"}], num_workers=0) as pool:
        assert pool.score(["x"], ["y"])[0] == [1.0]


def test_a_reward_that_allocates_without_bound_hits_the_memory_limit_and_scores_0(_repo_on_path):
    """Without the limit this sample would take the machine's memory; with it the allocation fails
    in the worker, which is replaced, and scoring goes on."""
    with RewardPool(MOODY, num_workers=1, timeout_s=30.0, memory_limit_mb=256) as pool:
        start = time.monotonic()
        rewards, metrics = pool.score(["ok", "hog", "ok"], ["1"] * 3)
        assert rewards == [1.0, 0.0, 1.0]
        assert metrics["reward_memory_limits"] == 1 and metrics["reward_errors"] == 0
        assert metrics["reward_timeouts"] == 0 and metrics["reward_worker_restarts"] == 1
        assert time.monotonic() - start < 25  # refused at once, not after the time limit
        rewards, metrics = pool.score(["ok"] * 2, ["1"] * 2)
        assert rewards == [1.0, 1.0] and metrics["reward_memory_limits"] == 0
