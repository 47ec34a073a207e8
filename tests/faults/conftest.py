"""Helpers for the failure tests: short runs of `system.train.main` in this process, on the
session's Ray cluster (tests/conftest.py), with faults injected by config or by killing actors."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_OVERRIDES

# short runs: the tests check what happens around a failure, not learning
FAULT_OVERRIDES = [*TEST_OVERRIDES, "eval.size=4"]


@dataclass
class Run:
    rc: int
    out: str  # the driver's stdout ([faults] lines, [checkpoint] lines, ...)
    err: str  # stderr: the one-line error of a stopped run
    dir: Path

    def records(self, kind: str = "train") -> list[dict]:
        lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def steps(self) -> list[int]:
        return [r["step"] for r in self.records()]


def run_main(capsys, tmp_path, name: str, *overrides: str, pool=None) -> Run:
    """python -m system.train --config configs/debug.yaml <test overrides> <overrides>, in process
    (on the actors of `pool` when its config allows)."""
    from system.train import main

    capsys.readouterr()
    rc = main(["--config", "configs/debug.yaml", *FAULT_OVERRIDES, f"output_dir={tmp_path}",
               f"run_name={name}", *overrides], pool=pool)
    captured = capsys.readouterr()
    return Run(rc, captured.out, captured.err, Path(tmp_path) / name)


def before_steps(monkeypatch, actions: dict) -> None:
    """Run actions[step](trainer) just before Trainer.train_step(step) (once: not on a retry)."""
    from system.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, step):
        action = actions.pop(step, None)
        if action is not None:
            action(self)
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def sigkill(group: str, rank: int = 0):
    """An action: SIGKILL the process of actor `rank` of trainer.<group> (as a node loss would)."""
    def action(trainer):
        import ray

        os.kill(ray.get(getattr(trainer, group).actors[rank].pid.remote()), signal.SIGKILL)
    return action


def ray_kill(group: str, rank: int = 0):
    """An action: ray.kill the actor, letting Ray restart it if it may."""
    def action(trainer):
        import ray

        ray.kill(getattr(trainer, group).actors[rank], no_restart=False)
    return action


@pytest.fixture
def faults_run(actor_pool, capsys, tmp_path):
    """run_main bound to this test's capsys and tmp_path and the session's actors:
    faults_run(name, *overrides)."""
    return lambda name, *overrides: run_main(capsys, tmp_path, name, *overrides, pool=actor_pool)
