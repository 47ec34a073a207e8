"""GPU tests: skipped, with the reason, where there is no CUDA GPU or no vllm (an error instead
under GPU_TESTS_REQUIRED=1, as tests/gpu/run_on_gpu.sh sets it)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    elif importlib.util.find_spec("vllm") is None:
        reason = "needs vllm's GPU build (pip install -e '.[gpu]')"
    if reason and os.environ.get("GPU_TESTS_REQUIRED") == "1":  # tests/gpu/run_on_gpu.sh
        raise pytest.UsageError(f"tests/gpu: {reason}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
