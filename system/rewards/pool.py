"""RewardPool: score responses in worker processes, with a time limit per sample.

A reward that hangs, raises or allocates past the worker's memory limit must never stop training:
that sample scores 0.0 and is counted (metrics reward_timeouts / reward_errors /
reward_memory_limits), and a hung or over-limit worker process is killed and replaced.
concurrent.futures cannot kill one hung task, so the pool manages its own processes:

1. Start num_workers processes ("spawn" by default: the driver runs Ray and torch threads, which
   fork would copy mid-flight). Each builds the rewards from the specs, then says it is ready.
2. score(): hand one sample at a time to each idle worker over its pipe, noting the deadline.
3. Wait on all pipes until the nearest deadline. A result frees its worker for the next sample;
   a passed deadline kills the worker (SIGKILL) and starts a replacement; a dead pipe (the worker
   crashed) is counted as an error and replaced the same way.

num_workers=0 is the fast path: rewards run in the calling process, with NO time limit (only
math-verify's own signal-based limit applies, and only in the main thread). Right for cheap rewards
such as the synthetic task's exact match; use workers for `math` or untrusted user rewards.
Workers are daemonic and stay in the driver's process group (so a job stop reaches them); a
reward cannot start processes of its own, and processes it started by other means are not killed.
"spawn" re-imports the driver's main module in every worker ("forkserver" once, in its server):
it needs an `if __name__ == "__main__":` guard, and its imports add to a worker's start time
(~0.1 s bare, ~0.5 s with math-verify). A replacement starts in the background; scoring goes on with the
others. One caller at a time: the pool is not thread-safe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Optional

from system.rewards.registry import CombinedReward, normalize_spec

_log = logging.getLogger(__name__)
_STARTUP_TIMEOUT_S = 120.0  # a worker that cannot import and build its rewards in this long is broken


def _limit_memory(extra_mb: float) -> None:
    """Cap this process's address space at what it holds now plus extra_mb: an allocation past it
    fails (MemoryError in Python) instead of growing until the machine's OOM killer picks a victim,
    which may be the driver or a learner."""
    import resource

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    cap = held + int(extra_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _worker_main(specs: list[dict], conn, memory_limit_mb: float = 0.0) -> None:
    """Worker loop: build the rewards, cap memory, say ready, then answer (idx, response, answer)
    until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it closes us
    try:
        reward = CombinedReward(specs)
        if memory_limit_mb:
            _limit_memory(memory_limit_mb)
    except BaseException:
        conn.send(("init_error", traceback.format_exc(limit=3)))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if task is None:
            return
        idx, response, answer = task
        try:
            total, parts = reward(response, answer)
            conn.send((idx, "ok", (total, parts)))
        except MemoryError:  # past the cap: this worker is replaced, as after a timeout
            conn.send((idx, "memory", "allocated past reward.memory_limit_mb"))
            return
        except Exception as err:  # noqa: BLE001 - any reward failure scores 0, training goes on
            conn.send((idx, "error", f"{type(err).__name__}: {err}"))


@dataclass
class _Tally:
    """What went wrong during one score() call; logged once per call, not once per sample."""

    timeouts: int = 0
    errors: int = 0
    memory: int = 0  # samples whose reward allocated past the worker's memory limit
    restarts: int = 0
    first_problem: Optional[str] = None

    def note(self, kind: str, idx: int, detail: str) -> None:
        if kind == "timeout":
            self.timeouts += 1
        elif kind == "memory":
            self.memory += 1
        else:
            self.errors += 1
        if self.first_problem is None:
            self.first_problem = f"sample {idx}: {detail}"


class _Worker:
    """One worker process, its pipe, and the sample it is scoring (if any)."""

    def __init__(self, ctx, specs: list[dict], memory_limit_mb: float):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(specs, child_conn, memory_limit_mb),
                                daemon=True, name="reward-worker")
        self.proc.start()
        child_conn.close()
        self.ready = False
        self.started = time.monotonic()
        self.task: Optional[int] = None  # index of the sample in flight
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Score (response, answer) pairs with a weighted reward, each sample within timeout_s.

    score(responses, answers) -> (rewards, metrics). metrics: reward_timeouts, reward_errors,
    reward_memory_limits, reward_worker_restarts, reward_time_s, and reward_<label> (mean of each
    part over the samples that scored). Use as a context manager or call close().

    memory_limit_mb: how much memory each worker may allocate beyond what it holds once its
    rewards are built (0: no limit); a sample whose reward needs more scores 0, is counted
    (reward_memory_limits) and its worker is replaced, like a timeout.
    """

    def __init__(self, specs: list, num_workers: int = 0, timeout_s: float = 10.0,
                 start_method: str = "spawn", memory_limit_mb: float = 0.0):
        if num_workers < 0:
            raise ValueError(f"RewardPool: num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        self.specs = [normalize_spec(s) for s in specs]
        self.reward = CombinedReward(self.specs)  # validates specs here, in the driver, before spawning
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = float(memory_limit_mb)
        self.num_workers = num_workers
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        try:
            self._workers = [_Worker(self._ctx, self.specs, self.memory_limit_mb)
                             for _ in range(num_workers)]
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # ---- public API -------------------------------------------------------------------------

    def score(self, responses: list[str], answers: list[str]) -> tuple[list[float], dict[str, Any]]:
        """Rewards (one float per sample; 0.0 for a sample that timed out or failed) and metrics."""
        if self._closed:
            raise RuntimeError("RewardPool.score: the pool is closed")
        if len(responses) != len(answers):
            raise ValueError(f"RewardPool.score: {len(responses)} responses but {len(answers)} answers")
        start = time.perf_counter()
        results: list[Optional[tuple]] = [None] * len(responses)
        tally = _Tally()
        if self.num_workers == 0:
            for i, (response, answer) in enumerate(zip(responses, answers)):
                try:
                    results[i] = self.reward(response, answer)
                except Exception as err:  # noqa: BLE001 - a failing reward scores 0 and is counted
                    tally.note("error", i, f"{type(err).__name__}: {err}")
        else:
            self._run(list(zip(responses, answers)), results, tally)
        if tally.first_problem is not None:
            _log.warning("rewards: %d timed out, %d over the memory limit, %d failed (scored 0); "
                         "first: %s", tally.timeouts, tally.memory, tally.errors, tally.first_problem)
        return self._summarize(results, tally, time.perf_counter() - start)

    def close(self) -> None:
        """Stop the workers (politely, then SIGKILL) and release their pipes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.proc.join(timeout=2)
            worker.kill()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; daemonic workers die with us anyway
            pass

    # ---- internals --------------------------------------------------------------------------

    def _run(self, samples: list[tuple[str, str]], results: list, tally: _Tally) -> None:
        """Dispatch samples to idle ready workers until every sample has a result or a failure."""
        pending = list(range(len(samples)))[::-1]  # a stack: pop() takes the lowest index
        remaining = len(samples)
        while remaining:
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    idx = pending.pop()
                    worker.conn.send((idx, *samples[idx]))
                    worker.task, worker.deadline = idx, now + self.timeout_s
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else _STARTUP_TIMEOUT_S
            ready_conns = wait([w.conn for w in self._workers], timeout=timeout)
            for i, worker in enumerate(self._workers):
                if worker.conn in ready_conns:
                    remaining -= self._receive(i, results, tally)
            now = time.monotonic()
            for i, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    tally.note("timeout", worker.task, f"no result in {self.timeout_s:g} s")
                    remaining -= 1
                    self._replace(i, tally)
                elif not worker.ready and now - worker.started > _STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"RewardPool: a worker did not start in {_STARTUP_TIMEOUT_S:.0f} s")

    def _receive(self, i: int, results: list, tally: _Tally) -> int:
        """Read one message from worker i; returns how many samples it settled (0 or 1)."""
        worker = self._workers[i]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (crash, OOM kill)
            worker.proc.join(timeout=5)
            if not worker.ready:
                raise RuntimeError("RewardPool: a worker exited while starting "
                                   f"(exit code {worker.proc.exitcode})") from None
            settled = int(worker.task is not None)
            if settled:
                tally.note("error", worker.task, f"worker died (exit code {worker.proc.exitcode})")
            self._replace(i, tally)
            return settled
        if message[0] == "ready":
            worker.ready = True
            return 0
        if message[0] == "init_error":
            raise RuntimeError(f"RewardPool: a worker failed to build its rewards:\n{message[1]}")
        idx, status, payload = message
        worker.task = None
        if status == "ok":
            results[idx] = payload
        elif status == "memory":
            tally.note("memory", idx, payload)
            self._replace(i, tally)
        else:
            tally.note("error", idx, payload)
        return 1

    def _replace(self, i: int, tally: _Tally) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx, self.specs, self.memory_limit_mb)
        tally.restarts += 1

    def _wait_ready(self) -> None:
        """Block until every worker has built its rewards (surfaces import errors at construction)."""
        while any(not w.ready for w in self._workers):
            waiting = [w.conn for w in self._workers if not w.ready]
            if not wait(waiting, timeout=_STARTUP_TIMEOUT_S):
                raise RuntimeError(f"RewardPool: workers did not start in {_STARTUP_TIMEOUT_S:.0f} s")
            for i, worker in enumerate(self._workers):
                if worker.conn in waiting and worker.conn.poll():
                    self._receive(i, [], _Tally())

    def _summarize(self, results: list, tally: _Tally, elapsed: float) -> tuple[list[float], dict]:
        rewards = [r[0] if r is not None else 0.0 for r in results]
        metrics: dict[str, Any] = {
            "reward_timeouts": tally.timeouts,
            "reward_errors": tally.errors,
            "reward_memory_limits": tally.memory,
            "reward_worker_restarts": tally.restarts,
            "reward_time_s": elapsed,
        }
        scored = [r[1] for r in results if r is not None]
        for label in self.reward.labels:
            values = [parts[label] for parts in scored]
            metrics[f"reward_{label}"] = sum(values) / len(values) if values else 0.0
        return rewards, metrics
