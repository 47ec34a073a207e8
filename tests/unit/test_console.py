"""The console: third-party notices that repeated on every run or sync are kept off it."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_vllm_rotary_reload_notice_is_dropped_and_other_layers_still_reported():
    from workers.vllm_engine import RotaryCacheNotice

    def record(layer):
        return logging.LogRecord(RotaryCacheNotice.LOGGER, logging.WARNING, __file__, 1,
                                 "%s: Failed to load weights", (layer,), None)

    keep = RotaryCacheNotice().filter
    assert not keep(record("RotaryEmbedding")) and not keep(record("Llama3RotaryEmbedding"))
    assert keep(record("QKVParallelLinear")) and keep(record("RMSNorm"))


def test_learner_processes_get_no_deepspeed_or_all_gather_notices():
    from system.config import load_config
    from system.actors import quiet_third_party

    env = quiet_third_party(load_config("configs/debug.yaml"))
    assert env["DS_ACCELERATOR"] == "cpu"
    code = ("import warnings, torch.distributed as d; warnings.warn('`torch.distributed.all_gather_into_tensor` "
            "is deprecated. Please use x instead.', FutureWarning); import deepspeed.accelerator as a; "
            "a.get_accelerator()")
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "all_gather_into_tensor" not in proc.stderr
    assert "DS_ACCELERATOR" not in quiet_third_party(load_config("configs/debug.yaml", ["learner.num_gpus=1"]))
