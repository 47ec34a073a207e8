"""Shared helpers: trainers built on the session's Ray cluster (the `ray_cluster` fixture is in
tests/conftest.py, shared with tests/faults), and ending every process of a session that a test
started for a Ray cluster of its own (test_job_submit.py, test_multinode.py)."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

# A short warm start: these tests check the pipeline, not how well the policy learns.
TEST_OVERRIDES = ["model.debug_settings={warm_start: {steps: 30}}", "eval.size=16",
                  "trainer.progress_bar=false", "trainer.prompts_per_step=8", "rollout.group_size=4",
                  "learner.minibatches=1"]


def build_trainer(tmp_path, overrides=(), pool=None):
    """A started Trainer for configs/debug.yaml with the test overrides, on the actors of `pool`
    when its config allows (the session's `actor_pool`); call stop_trainer after."""
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.rewards.pool import RewardPool
    from system.train import resolve_model
    from system.actors import Actors
    from system.trainer import Trainer

    cfg = load_config("configs/debug.yaml",
                      [*TEST_OVERRIDES, f"output_dir={tmp_path}", *overrides])
    model_path = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if pool is None:
        actors = Actors(cfg, model_path)
        actors.start()
    else:
        actors = pool.take(cfg, model_path)
    trainer = Trainer(cfg, actors, tokenizer, load_prompt_sets(cfg, tokenizer),
                      str(tmp_path / cfg.run_name), RewardPool([{"name": "exact"}], num_workers=0))
    trainer.actors.sync(trainer.version)  # reused rollout workers hold the last run's weights
    return trainer


def stop_trainer(trainer, pool=None) -> None:
    trainer.rewards.close()
    if pool is None:
        trainer.actors.stop()
    else:
        pool.give_back(ended=True)


def session_processes(sid: int) -> list:
    """Live processes in session `sid`, and their descendants (a job's driver may start its own
    session). Zombies are left out: they are already dead, waiting for init to reap them."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
        except (OSError, psutil.Error):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_session(sid: int) -> None:
    """SIGKILL the head's processes by pid, as `ray stop --force` would (gcs_server and raylet sit
    out a SIGTERM for many seconds), and wait until they are gone."""
    import psutil

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs = session_processes(sid)
        if not procs:
            return
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
