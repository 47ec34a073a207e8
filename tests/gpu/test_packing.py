"""Packed rows on a GPU (learner.packing / reference.packing = on): the final hidden states at the
response positions equal the padded forward's, for the attention implementations that pack for
free there (FlashAttention 2's varlen kernels, where the flash-attn package is installed; flex
attention's block mask) and for SDPA (a block-diagonal mask). The same equality on CPU/SDPA in
float64 is tests/unit/test_micro_batches.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from system.data.batch import build_batch
from workers.common import hidden_at


def long_tailed_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = [17, 300, 45, 1024, 90, 150, 16, 610]
    prompts = [torch.randint(1, vocab, (32,), generator=g).tolist() for _ in lengths]
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return build_batch(prompts, responses, pad_id=0)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention", "sdpa"])
def test_packed_rows_give_the_padded_hidden_states(attn, tmp_path):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attention_2 needs the flash-attn package")
    from tests.tiny_qwen import build_tiny_qwen
    from workers.common import load_causal_lm

    path = build_tiny_qwen(tmp_path / "model", vocab_size=512, dtype="bfloat16")
    device = torch.device("cuda")
    model = load_causal_lm(path, "bfloat16", device, attn_implementation=attn).eval()
    padded_model = load_causal_lm(path, "bfloat16", device, attn_implementation="sdpa").eval()
    batch = long_tailed_batch(512)
    ids, attn_mask, mask = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask))
    with torch.no_grad():
        want = hidden_at(padded_model.base_model, ids, attn_mask, mask, packed=False).float()
        got = hidden_at(model.base_model, ids, attn_mask, mask, packed=True).float()
    assert got.shape == want.shape
    # bf16 kernels accumulate in different orders: compare relative to the states' scale
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"{attn}: packed vs padded relative error {err:.3g}"
