"""LearnerSettings for learners that tests and benchmarks build without Ray or DeepSpeed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


def learner_test_settings(kl_mode: str = "full", **changes):
    """The debug config's LearnerSettings with `changes` (the KL mode by name)."""
    from system.algo.kl import get_kl_mode
    from system.config import load_config
    from system.settings import learner_settings

    return dataclasses.replace(learner_settings(load_config(DEBUG)), kl=get_kl_mode(kl_mode), **changes)
