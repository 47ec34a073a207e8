"""GPU tests: skipped, with the reason, where there is no CUDA GPU or no vllm."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    elif importlib.util.find_spec("vllm") is None:
        reason = "needs vllm's GPU build (pip install -e '.[gpu]')"
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
