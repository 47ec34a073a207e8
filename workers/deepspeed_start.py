"""What the learner keeps off DeepSpeed's start path: two pieces DeepSpeed sets up on every rank
that this learner never uses, and that cost most of its start-up on CPU (workers/learner.py calls
both before it joins DeepSpeed's group; tests/unit/test_learner_startup.py checks them).
"""

from __future__ import annotations

import sys
import types

import deepspeed


def skip_shm_op() -> None:
    """Keep DeepSpeed's shared-memory all-reduce op, which this learner never uses, off the start
    path on CPU.

    DeepSpeed's torch backend loads it on every CPU rank (deepspeed/comm/torch.py:
    TorchBackend.__init__ calls build_shm_op, which calls `builder.load()`), JIT-compiling it with
    ninja into TORCH_EXTENSIONS_DIR the first time in each installation (about 60 s on 2 cores).
    Only `inference_all_reduce` uses it (DeepSpeed's tensor-parallel layers,
    module_inject/layers.py), and without it that falls back to torch.distributed.all_reduce;
    ZeRO's collectives are torch.distributed's (gloo here). build_shm_op returns None for an op
    that `deepspeed.ops.__compatible_ops__` marks False.
    """
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def skip_muon() -> None:
    """Keep DeepSpeed's Muon optimizer module, which this learner never uses, from being imported.

    DeepSpeed imports it inside deepspeed.initialize with ZeRO (to add Muon to the optimizers ZeRO
    has tested: runtime/zero/utils.py is_zero_supported_optimizer) and in ZeRO's gradient reduction,
    each time only to ask whether the optimizer is a MuonWithAuxAdam. Importing it sets up
    torch.compile for its kernels (torch._inductor: about 1.6 s of CPU per learner rank on the
    debug config, most of its engine build). The learner's optimizers are torch's AdamW and SGD, so
    a stand-in module whose MuonWithAuxAdam nothing is an instance of answers the same.
    """
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stand_in = types.ModuleType(name, "stand-in: the learner never uses Muon (workers/deepspeed_start.py)")
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stand_in
