"""What a bf16 output head does to the sampler's log-probs (behavior_logp_gap on a GPU).

vLLM on a GPU runs a bf16 model's output head in bf16 unless told otherwise (`rollout.head_dtype`):
the logits are rounded to bf16 (8 bits of mantissa) before the softmax. The learner computes the same
logits from the same bf16 hidden states in float32 (system/algo/fused_kl.py upcasts). With
`algo.pi_old=sampler` the sampler's log-probs are pi_old in every importance ratio, so their error is
the ratio's error. This measures, on CPU, at tokens sampled at T=1 from the float32-head distribution:

    gap = |log softmax(fp32(h) @ fp32(W)) - log softmax(fp32(bf16(h @ W)))| at the sampled token

with h the model's own bf16 final hidden states. It isolates the head's rounding; the backbone's
kernels (vLLM's vs Hugging Face's, both bf16) add their own difference, which needs a GPU to measure.
`rollout.head_dtype=float32` (the default) makes vLLM compute the head in float32 from its bf16
hidden states, which removes this part of the gap.

Models: the warm-started debug model cast to bf16 (vocabulary 24) on the synthetic task's prompts
and solutions; a model of Qwen2.5-0.5B's shapes (V 151,936, H 896, tied head, 2 of its 24 layers,
random weights) on random tokens, its hidden states scaled so that the logits span what trained
models produce (random weights alone give near-uniform logits).

    python tests/benchmarks/bf16_logprobs.py [--no-append]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import torch

from _common import ROOT, markdown_table, publish, save_qwen_shape


def gap(hidden: torch.Tensor, weight: torch.Tensor, seed: int = 0) -> dict:
    """hidden [N, H] and weight [V, H] in bf16: statistics of the per-token log-prob gap."""
    fp32 = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)  # [N, V]
    bf16 = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V], logits rounded to bf16
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(fp32.exp(), 1, generator=g).squeeze(1)  # [N]
    d = (fp32 - bf16).gather(1, tokens[:, None]).squeeze(1).abs()
    logits = hidden.float() @ weight.float().T
    return {"tokens": len(tokens), "logit_std": float(logits.std()),
            "logit_max": float(logits.max(dim=-1).values.mean()),
            "mean": float(d.mean()), "p99": float(d.quantile(0.99)), "max": float(d.max())}


def debug_model_hidden() -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from system.config import load_config
    from system.data.synthetic import make_task
    from system.debug_model import encode_examples, ensure_debug_model

    cfg = load_config(str(ROOT / "configs" / "debug.yaml"), [f"model.debug_cache={ROOT / '.cache/debug_model'}"])
    task = dataclasses.asdict(cfg.data.synthetic)
    path = ensure_debug_model(cfg.model.debug_cache, cfg.model.debug_settings, task)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    _, heldout = make_task(**task)
    ids, labels = encode_examples(heldout[:256])  # prompt + solution + EOS; labels -100 elsewhere
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1][labels[:, 1:] != -100]
    return hidden, model.get_output_embeddings().weight


@torch.no_grad()
def qwen_hidden() -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_qwen_shape(d, "bfloat16", layers=2)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 151936, (4, 64), generator=torch.Generator().manual_seed(0))
    hidden = model.base_model(input_ids=ids).last_hidden_state.reshape(-1, 896)
    return hidden, model.get_output_embeddings().weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-append", action="store_true", help="print the table, do not append it")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    h, w = debug_model_hidden()
    rows.append(["debug model (trained), V=24", *_cells(gap(h, w))])
    h, w = qwen_hidden()
    unit = h.float().norm(dim=-1, keepdim=True).mean()
    for target in (1.0, 3.0, 5.0):  # logit std: scale the hidden states, keep them bf16
        scaled = h.float() / unit
        scaled = (scaled * target / float((scaled @ w.float().T).std())).to(torch.bfloat16)
        rows.append([f"Qwen2.5-0.5B shapes, V=151,936, logit std ~{target:g}", *_cells(gap(scaled, w))])
    table = markdown_table(["model", "tokens", "logit std", "mean max logit", "gap mean", "gap p99",
                            "gap max"], rows)
    body = (f"{table}\n\nThe gap at the sampled token between log-probs from a bf16 output head and "
            f"from the same bf16 hidden states through a float32 head (what the learner computes). "
            f"`rollout.head_dtype=float32` (default) runs vLLM's head in float32, removing this part; "
            f"the backbone's bf16 kernels (vLLM's against Hugging Face's) are not measured here.")
    publish("bf16_logprobs", "sampler log-probs from a bf16 output head vs the learner's float32", body,
            append=not args.no_append)


def _cells(s: dict) -> list:
    return [s["tokens"], f"{s['logit_std']:.2f}", f"{s['logit_max']:.1f}", f"{s['mean']:.2e}",
            f"{s['p99']:.2e}", f"{s['max']:.2e}"]


if __name__ == "__main__":
    main()
