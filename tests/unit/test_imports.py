"""`import system` (and the driver-side modules) must work without vllm and deepspeed."""

from __future__ import annotations

import subprocess
import sys

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vllm", "deepspeed", "peft"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def test_system_imports_without_vllm_and_deepspeed():
    code = BLOCK + """
import system, system.config, system.train, system.trainer, system.actor_group, system.checkpoint
import system.algo.kl, system.algo.losses, system.algo.advantages, system.rewards, system.data.batch
try:
    import deepspeed
except ImportError as err:
    assert "blocked" in str(err)
else:
    raise SystemExit("the import block did not work")
assert not any(m.split(".")[0] in ("vllm", "deepspeed", "peft") for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
