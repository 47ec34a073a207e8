"""A run's checkpoints: what is saved (the learners' state, the driver's state, the samples in
flight) and how a run continues from one. The files' atomic layout is system/checkpoint.py's.

A checkpoint of step s holds: learner/ (each rank's DeepSpeed state: weights, optimizer,
schedule, policy version), trainer_state.json (step, version, the prompt sampler's position before
the first sample in flight, the start-of-run evaluation, seed, fault counters) and, with
trainer.rollout_ahead > 0, pending_sample.pt: the samples drawn but not yet learned from. A resumed
run learns from those same responses, drawn by the same older policies, so it continues as the
uninterrupted run would have.
"""

from __future__ import annotations

import os
import time

import ray
import torch
from ray.exceptions import RayActorError

from system import chaos, checkpoint
from system.faults import RunStopped
from system.inflight import InFlight

PENDING = "pending_sample.pt"  # a checkpoint's rollout_ahead samples, drawn but not yet learned from


def save(t, step: int) -> str:
    """Write the checkpoint of step `step` of trainer `t`. If it cannot be written (a full disk, a
    volume gone), its partial files are removed and the run stops with one line; the previous
    checkpoint stays what `latest` names, whole and loadable."""
    t0 = time.perf_counter()
    tmp = checkpoint.begin(t.run_dir, step)
    try:
        path = _write(t, tmp, step)
    except RayActorError:  # a worker died meanwhile: system/faults.py recovers and retries
        raise
    except Exception as err:  # noqa: BLE001 - any write failure: stop, keeping the last one
        checkpoint.discard(tmp)
        raise RunStopped(f"checkpoint {step} could not be written ({checkpoint.write_problem(tmp, err)}); "
                         f"its partial files were removed and the previous checkpoint is intact. "
                         f"Free space on that volume (or point output_dir at a larger one) and "
                         f"resubmit the same command with trainer.resume=auto to continue from "
                         f"{checkpoint.find_resumable(t.run_dir) or 'the beginning'}") from None
    print(f"[checkpoint] step {step} -> {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return path


def _write(t, tmp: str, step: int) -> str:
    t.actors.learners.call("save_checkpoint", os.path.join(tmp, "learner"))
    # with samples in flight, the data position is the one before the first was drawn, and the
    # samples themselves are kept (this waits for the sampler)
    state = {"step": step, "version": t.version, "sampler": t.data_position(),
             "start_eval": t.start_eval, "seed": t.cfg.seed, "faults": t.faults.state_dict()}
    if t.inflight:
        torch.save([{"step": x.step, "version": x.version, "outputs": ray.get(x.launched[0])}
                    for x in t.inflight], os.path.join(tmp, PENDING))
        state["pending_sample"] = PENDING
    chaos.before_commit(t, step)  # a no-op outside the chaos run
    return checkpoint.commit(t.run_dir, tmp, step, state, t.cfg.checkpoint.keep)


def save_now(t) -> str | None:
    """A checkpoint of the state the learners hold now (step = policy version = updates done),
    before a run stops; None before the first update or the start-of-run evaluation."""
    if t.version == 0 or t.start_eval is None:
        return None
    path = os.path.join(checkpoint.checkpoint_root(t.run_dir), checkpoint.step_name(t.version))
    if os.path.isdir(path) and checkpoint.damage(path) is None:
        return path
    return save(t, t.version)


def resume(t, logger) -> tuple[int, dict | None]:
    """(steps already done, start-of-run evaluation) from the checkpoint trainer.resume names,
    loaded into trainer `t`; (0, None) to start from the beginning."""
    mode = t.cfg.trainer.resume
    if mode == "none":
        return 0, None
    path = checkpoint.find_resumable(t.run_dir) if mode == "auto" else mode
    if path is None:
        print("[resume] no checkpoint yet: starting from the beginning", flush=True)
        return 0, None
    problem = checkpoint.damage(path)
    if problem:
        raise RuntimeError(f"trainer.resume: checkpoint {path} cannot be loaded: {problem}")
    state = checkpoint.load_state(path)
    t.actors.learners.call("load_checkpoint", os.path.join(path, "learner"))
    t.version = state["version"]
    t.sampler.load_state_dict(state["sampler"])
    t.faults.load_state_dict(state.get("faults", {}))
    if state.get("pending_sample") and t.cfg.trainer.rollout_ahead:
        restore_pending(t, os.path.join(path, state["pending_sample"]))
    logger.truncate_after(state["step"])
    print(f"[resume] from {path}: step {state['step']}, policy version {t.version}", flush=True)
    return state["step"], state["start_eval"]


def restore_pending(t, path: str) -> None:
    """The checkpoint's in-flight samples, as if they had just been collected from the workers."""
    saved = torch.load(path, weights_only=False)
    want = t.cfg.trainer.prompts_per_step * t.cfg.rollout.group_size
    sizes = [sum(len(o["responses"]) for o in s["outputs"]) for s in saved]
    if any(n != want for n in sizes):
        print(f"[resume] the checkpoint's in-flight samples have {sizes} responses, this config "
              f"wants {want}: sampling them again", flush=True)
        return
    for s in saved[:t.cfg.trainer.rollout_ahead]:  # the rest is drawn again, fresher
        sampler_state = t.sampler.state_dict()
        rows = t.sampler.next(t.cfg.trainer.prompts_per_step)
        refs = [ray.put(o) for o in s["outputs"]]
        t.inflight.push(InFlight(s["step"], s["version"], rows, sampler_state, (refs, s["version"])))
