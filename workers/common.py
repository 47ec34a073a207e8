"""Process set-up shared by the actors: threads, seeds, device, model loading."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from system.data.micro_batches import packed_inputs, packed_positions
from system.preflight import head_config_problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def setup_process(torch_threads: int, seed: int) -> torch.device:
    """Pin torch threads (several actors share the cores), seed every generator, and return the
    device this process computes on (`actor_device`)."""
    torch.set_num_threads(torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_all(seed)
    return actor_device()


def actor_device() -> torch.device:
    """The accelerator Ray assigned this actor, else the CPU.

    An actor placed with num_gpus=0 computes on the CPU even on a GPU node: Ray 2.60 no longer
    hides the node's GPUs from it (ActorGroup hides them through CUDA_VISIBLE_DEVICES; this does not
    rely on it). An actor with GPUs sees exactly those (Ray sets CUDA_VISIBLE_DEVICES), so its
    first visible device is its own. Outside a Ray actor (scripts, tests): CUDA when available."""
    gpus = _assigned_gpus()
    if gpus is None:
        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = len(gpus) > 0
        if on_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"Ray assigned GPUs {gpus} to this actor, but torch sees no CUDA device "
                               f"(torch {torch.__version__}: a CPU build?)")
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def _assigned_gpus() -> list | None:
    """The GPU ids Ray assigned this actor; None outside a Ray actor."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_causal_lm(path: str, dtype: str, device: torch.device, trust_remote_code: bool = False,
                   attn_implementation: str | None = None):
    """attn_implementation: model.attn_implementation (sdpa, eager, flash_attention_2,
    flex_attention); None: transformers' default."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs)
    return model.to(device)


def hidden_at(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              loss_mask: torch.Tensor, packed: bool) -> torch.Tensor:
    """The transformer's final hidden states at the positions that predict response tokens: [M, H],
    in the order of loss_mask's row-major nonzeros. input_ids, attention_mask: [n, L] right-padded;
    loss_mask: [n, L-1]. packed: the real tokens as one row with position ids restarting per
    sequence and no attention mask (system/data/micro_batches.py), else the padded rows."""
    if not packed:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, :-1][loss_mask.bool()]
    ids, positions = packed_inputs(input_ids, attention_mask)  # [1, S] each
    # no cache: with one, transformers reads the position ids as a continuation, not as packing
    out = backbone(input_ids=ids, position_ids=positions, use_cache=False)
    return out.last_hidden_state[0][packed_positions(attention_mask, loss_mask)]


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to [B, L] ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def output_head_problem(model) -> str | None:
    """Why this model's logits are not `final hidden state @ W.T` (all the fused KL op computes), or
    None when they are (Qwen2, Llama, Mistral, ...).

    Checks the known config fields and a bias on the head (as the driver's preflight does, before
    any actor starts), then the model itself on a few tokens: its logits must equal base_model's
    last hidden state times the head weight."""
    problem = head_config_problem(model)
    if problem:
        return problem
    name, head = type(model).__name__, model.get_output_embeddings()
    ids = torch.arange(8, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]  # [1, 8]
    logits = model(input_ids=ids).logits.float()  # [1, 8, V]
    hidden = model.base_model(input_ids=ids).last_hidden_state.float()  # [1, 8, H]
    plain = hidden @ head.weight.float().T  # [1, 8, V]
    # loose enough for bf16 rounding, far tighter than any scale or cap that matters
    if not torch.allclose(logits, plain, rtol=1e-2, atol=1e-2 * float(plain.abs().max())):
        return (f"{name}'s logits are not its final hidden state @ output head weight (largest "
                f"difference {float((logits - plain).abs().max()):.3g}); the learner computes hidden @ W.T only")
    return None
