"""Failure handling for the driver: survive what can be survived, stop clearly on what cannot.

What happens on each failure (the Trainer routes every step, sync and evaluation through here):
1. A rollout or reference worker dies: Ray restarts it (as often as it dies: the driver decides
   how many restarts a run survives) and its __init__ reloads the model. The call that failed is noticed
   here, every actor is asked for its process id (a new id = restarted), and then: a restarted
   rollout worker cannot rejoin the old weight-sync group, so every member (learner rank 0 and all
   rollout workers) builds a fresh one on a new port, the current weights are sent and the
   versions checked; the interrupted step is retried from the prompt sampler's state at its
   start (the in-flight rollout_ahead samples are dropped). Restarts are counted (metric
   `actor_restarts`, for the whole run); past faults.max_actor_restarts in one submission the
   run saves a checkpoint and stops. A lost node is the same case: Ray moves the worker's
   placement bundle to a node that can hold it and restarts it there. Each recovery logs its
   time, from the failed call noticed to the workers back ("[faults] recovered in 21.7s: ...").
2. A learner rank dies (its process, or its whole node): DeepSpeed's group cannot lose a member,
   so the run stops with an error naming the rank, its node and the checkpoint to resume from
   (trainer.resume=auto).
3. The weight-sync checksums disagree: the sync is retried once, then the run saves a checkpoint
   (the learners' state is sound) and stops.
4. The learners skipped an update for a NaN/inf loss or gradient (workers/learner.py): counted
   (metric `nonfinite_skipped`); after faults.max_nonfinite_in_a_row steps in a row the run stops,
   without writing a checkpoint, and no checkpoint is written during such a streak.
Anything else (a bug) is raised as it is. A stop raises RunStopped, whose message is the one line
system/train.py prints.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import ActorDiedError, RayActorError

from system import checkpoint

_LEARNER_PROBE_S = 60.0  # a learner that answers nothing in this long is busy, not known dead


class RunStopped(RuntimeError):
    """A failure the run cannot survive; the message says what happened and how to go on."""


class ChecksumMismatch(RuntimeError):
    """A rollout worker's checksum of the loaded weights differs from the learner's."""


def _cause(err: BaseException) -> str:
    """A short reason from a Ray error (its messages run to many lines)."""
    inner = getattr(err, "cause", None)  # RayTaskError: what the actor's method raised
    if isinstance(inner, BaseException):
        err = inner
    text = str(err)
    for marker in ("The actor is dead because ", "Worker exit detail: "):
        if marker in text:
            return text.split(marker, 1)[1].split(". ")[0].strip().rstrip(".")
    if "The actor is restarting" in text:
        return "the actor was being restarted"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"[:200]


def probe(actors: list, timeout_s: float) -> list[tuple[str, object]]:
    """Ask every actor for its pid, all at once: ("alive", pid) | ("dead", cause) | ("unresponsive",
    None). An actor Ray is restarting is asked again until it answers or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    out: list = [("unresponsive", None)] * len(actors)
    pending = {a.pid.remote(): i for i, a in enumerate(actors)}
    while pending and time.monotonic() < deadline:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            i = pending.pop(ref)
            try:
                out[i] = ("alive", ray.get(ref))
            except ActorDiedError as err:
                out[i] = ("dead", _cause(err))
            except RayActorError:  # unavailable: being restarted; ask again
                time.sleep(0.5)
                pending[actors[i].pid.remote()] = i
    return out


class FaultHandler:
    """Recovery for one run. It talks to the actors (system/actors.py: their groups, process ids,
    sync group and sync) and to the loop through a narrow interface, `loop`:
        loop.version                 policy version (= updates done)
        loop.data_position()         where the prompt data stands, before any sample in flight
        loop.rewind(position)        forget the samples in flight, data back to `position`
        loop.save_now()              a checkpoint of the learners' state now (path, or None)
        loop.run_dir                 where the checkpoints are
    """

    def __init__(self, actors, cfg, loop):
        self.actors, self.cfg, self.loop = actors, cfg, loop
        self.pids: dict[str, list] = {}
        self.learner_nodes: list[str] = []  # "node <id> (<address>)" of each learner rank
        self.restarts = 0  # in this submission: the limit applies to these
        self.restarts_total = 0  # over the whole run, resumes included (metric actor_restarts)
        self.nonfinite_total = 0  # skipped optimizer steps over the run (metric nonfinite_skipped)
        self.nonfinite_in_a_row = 0  # training steps in a row with a skipped update

    def state_dict(self) -> dict:
        return {"actor_restarts": self.restarts_total, "nonfinite_skipped": self.nonfinite_total}

    def load_state_dict(self, state: dict) -> None:
        self.restarts_total = state.get("actor_restarts", 0)
        self.nonfinite_total = state.get("nonfinite_skipped", 0)

    def record_pids(self) -> None:
        self.pids = self.actors.pids()
        # where each learner rank runs, read now: once its node is gone, Ray no longer says
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.learner_nodes = [f"node {str(n)[:6]} ({address.get(n, '?')})"
                              for n in self.actors.learners.nodes()]

    # ---- the guarded calls ------------------------------------------------------------------
    def run_step(self, step: int, train_step) -> dict:
        """train_step(step), retried from the same prompts after a rollout/reference restart."""
        loop = self.loop
        while True:
            start, version = loop.data_position(), loop.version
            try:
                metrics = train_step(step)
                break
            except RunStopped:
                raise
            except Exception as err:  # noqa: BLE001 - recover() re-raises what it cannot handle
                if loop.version != version:  # it escaped sync(), after the update: never learn twice
                    raise
                loop.rewind(start)  # this step's sample too, taken out already
                self.recover(err, f"step {step}")
        self._count_nonfinite(step, metrics)
        return {**metrics, "actor_restarts": self.restarts_total,
                "nonfinite_skipped": self.nonfinite_total}

    def call(self, fn, what: str):
        """fn() (e.g. an evaluation), redone after a rollout/reference restart."""
        while True:
            try:
                return fn()
            except RunStopped:
                raise
            except Exception as err:  # noqa: BLE001
                self.recover(err, what)

    def sync(self) -> None:
        """Actors.sync, with a restart recovered and a checksum mismatch retried once."""
        mismatches = 0
        while True:
            try:
                return self.actors.sync(self.loop.version)
            except ChecksumMismatch as err:
                mismatches += 1
                if mismatches > 1:
                    self.stop(f"{err}, and again on the retry", save=True)
                print(f"[faults] {err}: retrying the sync once", flush=True)
            except RunStopped:
                raise
            except Exception as err:  # noqa: BLE001
                self.recover(err, f"weight sync (policy version {self.loop.version})", resync=False)

    # ---- what happened, and what to do about it ---------------------------------------------
    def recover(self, err: BaseException, what: str, resync: bool = True) -> None:
        """_recover_once(), again for each new failure during the recovery itself (another worker
        lost while rejoining); raises `err` as it is when it was no fault."""
        while True:
            try:
                return self._recover_once(err, what, resync)
            except RunStopped:
                raise
            except Exception as again:  # noqa: BLE001
                if again is err:
                    raise
                err = again

    def _recover_once(self, err: BaseException, what: str, resync: bool = True) -> None:
        """After `err` during `what`: stop if a learner died; if rollout/reference workers were
        restarted, count them and bring them back in (new sync group, current weights); if
        nothing died, re-raise `err`."""
        t0 = time.perf_counter()
        self._check_learners()
        restarted = self._restarted()
        if not restarted:
            raise err
        self.restarts += len(restarted)
        self.restarts_total += len(restarted)
        names = ", ".join(f"{group} worker {rank}" for group, rank in restarted)
        limit = self.cfg.max_actor_restarts
        if self.restarts > limit:
            self.stop(f"{names} restarted during {what} ({_cause(err)}): {self.restarts} worker "
                      f"restarts in this submission, more than faults.max_actor_restarts={limit}",
                      save=True)
        print(f"[faults] {names} restarted during {what} ({_cause(err)}); restart {self.restarts} "
              f"of at most {limit}: redoing it", flush=True)
        if any(group == "rollout" for group, _ in restarted):
            self._rejoin_rollout(resync)
        print(f"[faults] recovered in {time.perf_counter() - t0:.1f}s: {names} back", flush=True)

    def _check_learners(self) -> None:
        states = probe(self.actors.learners.actors, _LEARNER_PROBE_S)
        for rank, (state, cause) in enumerate(states):
            if state == "dead":
                where = self.learner_nodes[rank] if rank < len(self.learner_nodes) else "an unknown node"
                self.stop(f"learner rank {rank} on {where} died: {cause}", save=False)

    def _restarted(self) -> list[tuple[str, int]]:
        """(group, rank) of every rollout/reference worker with a new process since last seen."""
        out = []
        for name in ("rollout", "reference"):
            for rank, (state, info) in enumerate(probe(self.actors.groups()[name].actors,
                                                       self.cfg.restart_timeout_s)):
                if state == "dead":
                    self.stop(f"{name} worker {rank} died and Ray could not restart it: {info}",
                              save=True)
                if state == "unresponsive":
                    self.stop(f"{name} worker {rank} did not answer within faults.restart_timeout_s="
                              f"{self.cfg.restart_timeout_s:g}", save=True)
                if info != self.pids[name][rank]:
                    out.append((name, rank))
                    self.pids[name][rank] = info
        return out

    def _rejoin_rollout(self, resync: bool) -> None:
        """A restarted process cannot rejoin the old gloo/NCCL group: every member builds a new
        one on a new port; then (resync) the current weights go out and the versions must match."""
        self.loop.rewind(self.loop.data_position())  # sampled, in part, by a process that is gone
        self.actors.init_sync()
        if resync:
            self.sync()
            versions = self.actors.rollout.call("get_version")
            if any(v != self.loop.version for v in versions):
                raise RuntimeError(f"after a restart, rollout versions {versions} != {self.loop.version}")

    def _count_nonfinite(self, step: int, metrics: dict) -> None:
        skipped = metrics.get("updates_skipped", 0)
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_total += skipped
        self.nonfinite_in_a_row += 1
        print(f"[faults] step {step}: {skipped} update(s) skipped for a NaN/inf loss or gradient "
              f"({self.nonfinite_in_a_row} step(s) in a row; the run stops at "
              f"{self.cfg.max_nonfinite_in_a_row})", flush=True)

    @property
    def healthy(self) -> bool:
        """False during a streak of skipped updates: no checkpoint is written then."""
        return self.nonfinite_in_a_row == 0

    def check_nonfinite(self, step: int) -> None:
        """Stop (after the step is logged) when too many steps in a row skipped their update."""
        n, limit = self.nonfinite_in_a_row, self.cfg.max_nonfinite_in_a_row
        if n >= limit:
            self.stop(f"step {step}: the learners skipped the update for a NaN/inf loss or gradient "
                      f"{n} steps in a row (faults.max_nonfinite_in_a_row={limit}); no checkpoint "
                      f"was written from those steps (a lower learner.lr may help)", save=False)

    # ---- stopping -----------------------------------------------------------------------------
    def stop(self, reason: str, save: bool) -> None:
        """Raise RunStopped; with save, first checkpoint the learners' state (nothing is lost)."""
        path = self._save() if save else None
        latest = path or checkpoint.find_resumable(self.loop.run_dir)
        where = (f"the latest checkpoint {latest}" if latest
                 else "the beginning (no checkpoint was saved yet)")
        raise RunStopped(f"{reason}. Resubmit the same command with trainer.resume=auto to "
                         f"continue from {where}")

    def _save(self) -> str | None:
        """A checkpoint of the state the learners hold, if one can be written."""
        try:
            return self.loop.save_now()
        except Exception as err:  # noqa: BLE001 - the stop's own message matters more
            print(f"[faults] could not save a checkpoint before stopping: {_cause(err)}", flush=True)
            return None
