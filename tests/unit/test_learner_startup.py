"""A CPU learner joins its process group without compiling anything: DeepSpeed would JIT-compile its
shared-memory all-reduce op into TORCH_EXTENSIONS_DIR (about 60 s on 2 cores), which training never
uses; nor does ZeRO's optimizer check set up torch.compile for DeepSpeed's Muon kernels. Run in a
subprocess, so that this test's process group does not outlive it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]

JOIN = """
import torch
from deepspeed.comm import comm
from system.config import load_config
from system.settings import learner_settings
from workers.learner import LearnerWorker

learner = LearnerWorker(0, 1, "unused", learner_settings(load_config("configs/debug.yaml")))
learner.init_process_group(*learner.address())
flag = torch.ones(1)
torch.distributed.all_reduce(flag)
print("shm op:", comm.cdb.shm_comm_op, "all_reduce:", float(flag))
import sys
from deepspeed.runtime.zero.utils import is_zero_supported_optimizer
is_zero_supported_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))  # as ZeRO's engine asks
print("compiler set up:", "torch._inductor.compile_fx" in sys.modules)  # what torch.compile(fn) imports
"""


def test_cpu_learner_joins_its_group_without_compiling(tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", JOIN], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm op: None all_reduce: 1.0" in proc.stdout
    assert "compiler set up: False" in proc.stdout  # DeepSpeed's Muon module left out (~1.6 CPU-s)
    assert not extensions.exists() or not any(extensions.iterdir())
