"""Faults injected on a schedule, for the chaos run (system/experiments/chaos.py) and its test
(tests/faults/test_chaos.py). Nothing in a real run installs a hook: then every call here is a no-op.

    hook = chaos.Hook(schedule, log_path, tokens_dir)   # schedule: [Fault(step, kind), ...]
    with chaos.installed(hook):                          # in the driver's process
        system.train.main([... *hook.overrides()])

The Trainer calls the installed hook at two points: before each step (`before_step`) and just before
a checkpoint is committed (`before_commit`, system/resume.py). Each fault fires once per run, also
across submissions: the hook appends every fault it fires, and every step it starts, to `log_path`
(JSON lines, with the wall time), and a hook built on the same log skips what already fired. The
faults, by kind (`KINDS`), and how each is injected:
    rollout_killed            SIGKILL rollout worker 0 before the step
    rollout_killed_generating rollout worker 0 kills itself halfway through the step's sampling
    rollout_killed_mid_sync   rollout worker 0 kills itself after the first bucket of the step's sync
    reference_killed          SIGKILL reference worker 0 before the step
    node_lost                 the node of rollout worker 0 is removed (its raylet and every process
                              under it killed at once, as a machine lost), on a multi-node cluster
    learner_killed            SIGKILL learner rank 1 before the step: the run stops, and is resubmitted
    sync_corrupted            rollout worker 0 loads one weight wrong in the step's first sync
    nonfinite_update          the step's gradients are NaN (faults.nan_grad_at, in overrides())
    reward_hangs              one wrong response of the step hangs its reward worker
    reward_raises             one wrong response of the step makes its reward function raise
    driver_killed_mid_checkpoint  SIGKILL of the driver itself, the step's checkpoint written but
                              not yet committed
The reward faults strike responses the reward scores 0 anyway (a hang or an error scores 0), so
they cost time but change no number: as with every fault here but nonfinite_update (an update
skipped by design), the run must end with the weights it would have had without it. Their reward
is `exact_unless_told`, in both runs compared (Hook.overrides()).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass

KINDS = ("rollout_killed", "rollout_killed_generating", "rollout_killed_mid_sync", "reference_killed",
         "node_lost", "learner_killed", "sync_corrupted", "nonfinite_update", "reward_hangs",
         "reward_raises", "driver_killed_mid_checkpoint")
PHASE = {"rollout_killed_generating": "during sampling", "rollout_killed_mid_sync": "during the sync",
         "driver_killed_mid_checkpoint": "during the checkpoint", "nonfinite_update": "in the update",
         "reward_hangs": "during scoring", "reward_raises": "during scoring"}


@dataclass(frozen=True, order=True)
class Fault:
    step: int
    kind: str

    @property
    def phase(self) -> str:
        return PHASE.get(self.kind, "before the step")


def plan(seed: int, steps: int, checkpoint_every: int) -> list[Fault]:
    """A seeded schedule: every kind once, and the rollout worker killed while sampling and the
    reference worker killed a second time (13 faults), on distinct steps in 2..steps-1; the driver
    is killed during a checkpoint that has an earlier one to resume from."""
    rng = random.Random(seed)
    checkpoints = list(range(checkpoint_every, steps, checkpoint_every))
    if not checkpoints:
        raise ValueError(f"a chaos run needs checkpoints: {steps} steps, one every {checkpoint_every}")
    driver = rng.choice(checkpoints[1:] or checkpoints)
    kinds = [k for k in KINDS if k != "driver_killed_mid_checkpoint"]
    kinds += ["rollout_killed_generating", "reference_killed"]
    free = [s for s in range(2, steps) if s != driver]
    if len(free) < len(kinds):
        raise ValueError(f"{steps} steps are too few for {len(kinds) + 1} faults on distinct steps")
    chosen = rng.sample(free, len(kinds))
    return sorted([Fault(driver, "driver_killed_mid_checkpoint"),
                   *(Fault(s, k) for s, k in zip(chosen, kinds))])


def exact_unless_told(response: str, answer: str, told: str = "") -> float:
    """The synthetic task's reward (`exact`); on a response it scores 0, it first claims one token
    file in the folder `told`, if there is one: `hang*` hangs this reward, `raise*` raises."""
    from system.data.synthetic import exact_reward

    score = exact_reward(response, answer)
    if score or not told:
        return score
    for name in sorted(os.listdir(told)):
        try:
            os.remove(os.path.join(told, name))  # claimed by one worker only
        except FileNotFoundError:
            continue
        if name.startswith("hang"):
            time.sleep(3600)
        raise RuntimeError("this reward fails on purpose (chaos: reward_raises)")
    return score


class Hook:
    def __init__(self, schedule: list[Fault], log_path: str, tokens_dir: str):
        self.log_path, self.tokens_dir = log_path, tokens_dir
        os.makedirs(tokens_dir, exist_ok=True)
        done = {(e["step"], e["kind"]) for e in read_log(log_path) if e["event"] == "fault"}
        self.pending = [f for f in schedule if (f.step, f.kind) not in done]
        self.schedule = list(schedule)

    def overrides(self) -> list[str]:
        """Config overrides of the run (and of a run compared with it: the reward is the same)."""
        nan = [f.step for f in self.schedule if f.kind == "nonfinite_update"]
        return [f"faults.nan_grad_at={nan}", "reward.functions=[{name: 'system.chaos:exact_unless_told', "
                f"kwargs: {{told: '{self.tokens_dir}'}}}}]"]

    def _log(self, **event) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({**event, "t": time.time(), "pid": os.getpid()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _due(self, step: int, at_commit: bool) -> list[Fault]:
        due = [f for f in self.pending if f.step == step
               and (f.kind == "driver_killed_mid_checkpoint") == at_commit]
        for fault in due:
            self.pending.remove(fault)
            self._log(event="fault", **asdict(fault))
            print(f"[chaos] step {step}: {fault.kind} ({fault.phase})", flush=True)
        return due

    def before_step(self, trainer, step: int) -> None:
        self._log(event="step", step=step)
        for fault in self._due(step, at_commit=False):
            _INJECT[fault.kind](trainer, step, self.tokens_dir)

    def before_commit(self, trainer, step: int) -> None:
        if self._due(step, at_commit=True):
            os.kill(os.getpid(), signal.SIGKILL)


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- how each kind is injected ----------------------------------------------------------------
def _sigkill(group: str, rank: int = 0):
    def inject(trainer, step, tokens):
        import ray

        os.kill(ray.get(getattr(trainer, group).actors[rank].pid.remote()), signal.SIGKILL)
    return inject


def _ask_rollout(method: str, *args):
    def inject(trainer, step, tokens):
        import ray

        ray.get(getattr(trainer.rollout.actors[0], method).remote(*args))
    return inject


def _token(prefix: str):
    def inject(trainer, step, tokens):
        os.makedirs(tokens, exist_ok=True)
        open(os.path.join(tokens, f"{prefix}-{step}"), "w").close()
    return inject


def _corrupt(trainer, step, tokens):
    import ray

    ray.get(trainer.rollout.actors[0].corrupt_syncs.remote({step: 1}))  # version `step`, once


def _lose_node(trainer, step, tokens):
    """Kill the raylet of rollout worker 0's node and every process under it, at once."""
    import psutil
    import ray

    node = trainer.rollout.nodes()[0]
    if node == ray.get_runtime_context().get_node_id():
        raise RuntimeError("chaos node_lost: rollout worker 0 runs on the driver's node; a multi-node "
                           "cluster is needed (system/experiments/chaos.py starts one)")
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "raylet" in (proc.info["name"] or "") and f"--node_id={node}" in (proc.info["cmdline"] or []):
            for p in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            print(f"[chaos] node {node[:6]} removed (raylet pid {proc.pid} and its processes)", flush=True)
            return
    raise RuntimeError(f"chaos node_lost: no raylet of node {node} on this machine")


_INJECT = {
    "rollout_killed": _sigkill("rollout"),
    "rollout_killed_generating": _ask_rollout("die_during_next_generate"),
    "rollout_killed_mid_sync": _ask_rollout("die_during_next_sync"),
    "reference_killed": _sigkill("reference"),
    "node_lost": _lose_node,
    "learner_killed": _sigkill("learners", rank=1),
    "sync_corrupted": _corrupt,
    "nonfinite_update": lambda trainer, step, tokens: None,  # faults.nan_grad_at: overrides()
    "reward_hangs": _token("hang"),
    "reward_raises": _token("raise"),
}

# ---- the installed hook -----------------------------------------------------------------------
_installed: Hook | None = None


@contextlib.contextmanager
def installed(hook: Hook):
    global _installed
    _installed = hook
    try:
        yield hook
    finally:
        _installed = None


def before_step(trainer, step: int) -> None:
    if _installed is not None:
        _installed.before_step(trainer, step)


def before_commit(trainer, step: int) -> None:
    if _installed is not None:
        _installed.before_commit(trainer, step)
