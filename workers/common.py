"""Process set-up shared by the actors: threads, seeds, device, model loading."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def setup_process(torch_threads: int, seed: int) -> torch.device:
    """Pin torch threads (several actors share the cores) and seed every generator."""
    torch.set_num_threads(torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_all(seed)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_causal_lm(path: str, dtype: str, device: torch.device, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.to(device)


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


# Model config fields that change the logits after the output head's matmul (Gemma 2/3 soft-capping,
# Cohere's logit scale, Granite's logit divisor); the value that leaves the logits unchanged.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@torch.no_grad()
def output_head_problem(model) -> str | None:
    """Why this model's logits are not `final hidden state @ W.T` (all the fused KL op computes), or
    None when they are (Qwen2, Llama, Mistral, ...).

    Checks the known config fields, a bias on the head, then the model itself on a few tokens:
    its logits must equal base_model's last hidden state times the head weight."""
    cfg, head = model.config, model.get_output_embeddings()
    name = type(model).__name__
    for key, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(cfg, key, None)
        if value is not None and value != neutral:
            return (f"{name} transforms its logits after the output head ({key}={value}); the "
                    f"learner computes logits as hidden @ W.T only")
    if head is None or getattr(head, "bias", None) is not None:
        return f"{name}'s output head is not a bias-free linear layer; the learner needs hidden @ W.T"
    ids = torch.arange(8, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]  # [1, 8]
    logits = model(input_ids=ids).logits.float()  # [1, 8, V]
    hidden = model.base_model(input_ids=ids).last_hidden_state.float()  # [1, 8, H]
    plain = hidden @ head.weight.float().T  # [1, 8, V]
    # loose enough for bf16 rounding, far tighter than any scale or cap that matters
    if not torch.allclose(logits, plain, rtol=1e-2, atol=1e-2 * float(plain.abs().max())):
        return (f"{name}'s logits are not its final hidden state @ output head weight (largest "
                f"difference {float((logits - plain).abs().max()):.3g}); the learner computes hidden @ W.T only")
    return None
