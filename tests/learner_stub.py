"""A LearnerWorker on one rank without Ray, a process group or DeepSpeed, for the tests and
benchmarks that drive its loss and update directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")

# what the stubbed learners share unless a caller changes it
_STUB = {"chunk_size": 5, "zero_stage": 0, "minibatches": 1, "clip_low": 0.2, "clip_high": 0.2,
         "dual_clip": None, "kl_seq_weight": "token", "kl_prefix_cap": 0.0, "pi_old": "sampler"}


class StubEngine:
    """What the learner uses of DeepSpeed's engine, for one rank: the wrapped module, callable;
    backward accumulates into .grad; the step leaves the gradients for the caller to read."""
    skipped_steps = 0

    def __init__(self, module):
        self.module, self.optimizer = module, None

    def __call__(self, *args):
        return self.module(*args)

    def train(self, mode: bool = True):
        self.module.train(mode)

    def eval(self):
        self.module.eval()

    def set_gradient_accumulation_boundary(self, boundary: bool):
        pass

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


def stub_learner(module, kl_mode: str = "full", device=None, **changes):
    """A LearnerWorker around `module` (a PolicyWithHead) with a StubEngine, and the debug config's
    settings with _STUB's and `changes` (the KL mode by name)."""
    import torch

    from system.algo.kl import get_kl_mode
    from system.config import load_config
    from system.settings import learner_settings
    from workers.learner import LearnerWorker

    w = LearnerWorker.__new__(LearnerWorker)
    w.engine = StubEngine(module)
    w.device, w.world_size, w.version, w.grad_norm = device or torch.device("cpu"), 1, 0, None
    w.settings = dataclasses.replace(learner_settings(load_config(DEBUG)), kl=get_kl_mode(kl_mode),
                                     **{**_STUB, **changes})
    w.nonfinite_at = {"loss": (), "grad": ()}
    return w
