"""The gradient diagnostic of ``kl_frontier --diagnostic`` (its docstring says what and why): each KL
mode's gradient on one fixed batch of the debug model, against a many-sample estimate of the exact
gradient of the sequence KL, and the share of the KL-to-go term in full_seq's gradient.

Run:
    python -m system.experiments.kl_frontier --diagnostic
    python -m system.experiments.kl_frontier --diagnostic --ref-samples 256 --diag-prompts 8   # smaller
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from system.algo.kl import full_kl_from_logits, kl_in_reward, logprobs_from_logits, sampled_kl
from system.algo.kl_seq import group_kl_baseline, seq_kl_term

DIAG_MODES = ("full", "full_seq", "full_seq_prefix", "k3", "reward")


def add_arguments(ap) -> None:
    ap.add_argument("--policy", default="",
                    help="pi_theta's model directory (default: pi_ref moved by --theta-drift)")
    ap.add_argument("--theta-drift", type=float, default=0.3, help="pi_theta: weights + drift * std * noise")
    ap.add_argument("--old-drift", type=float, default=0.1,
                    help="pi_old: pi_theta's weights moved again (0: on-policy)")
    ap.add_argument("--diag-prompts", type=int, default=16, help="held-out prompts in the fixed batch")
    ap.add_argument("--group", type=int, default=8, help="responses per prompt")
    ap.add_argument("--ref-samples", type=int, default=2048, help="responses for the many-sample estimates")
    ap.add_argument("--diag-seed", type=int, default=0)


def moved(model, drift: float, seed: int):
    """A copy of `model` with every weight moved by drift * (its tensor's std) * N(0, 1)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(drift * p.std() * torch.randn(p.shape, generator=g))
    return out


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], n: int, max_new: int, eos: int, pad: int, seed: int):
    """n responses per prompt at T = 1, rows grouped by prompt: (ids [N, P + R], mask [N, R])."""
    torch.manual_seed(seed)
    x = torch.tensor(prompt_ids)  # [p, P]: one length for the debug task
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=max_new, num_return_sequences=n,
                         pad_token_id=pad, eos_token_id=eos)
    resp = out[:, x.shape[1]:]
    is_eos = (resp == eos).long()
    return out, ((is_eos.cumsum(-1) - is_eos) == 0).float()  # up to and including the first EOS


def mode_losses(policy, ref, old, ids, mask, prompt_len: int, group: int) -> dict[str, torch.Tensor]:
    """Each mode's KL term summed over tokens, summed over the responses given (with grad)."""
    attn = torch.cat([torch.ones(ids.shape[0], prompt_len, dtype=torch.long), mask.long()], 1)
    resp = ids[:, prompt_len:]  # [N, R]
    logits = policy(input_ids=ids, attention_mask=attn).logits[:, prompt_len - 1:-1]  # [N, R, V]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=attn).logits[:, prompt_len - 1:-1]
        old_logits = old(input_ids=ids, attention_mask=attn).logits[:, prompt_len - 1:-1]
        old_logp = logprobs_from_logits(old_logits, resp)
        ref_logp = logprobs_from_logits(ref_logits, resp)
    logp = logprobs_from_logits(logits, resp)  # [N, R]
    full_kl = full_kl_from_logits(logits, ref_logits)  # [N, R]
    k1 = (old_logp - ref_logp) * mask
    base = group_kl_baseline(k1, mask, group)
    seq_tok, _ = seq_kl_term(full_kl, logp, old_logp, mask, baseline=base)
    seq_pre, _ = seq_kl_term(full_kl, logp, old_logp, mask, baseline=base, weighting="prefix")
    adv, _ = kl_in_reward(torch.zeros(ids.shape[0]), k1, mask, 1.0)  # -sum_{t'>=t} k1
    ratio = torch.exp(logp - old_logp)
    terms = {"full": full_kl, "full_seq": seq_tok, "full_seq_prefix": seq_pre,
             "k3": sampled_kl(logp, ref_logp, "k3"), "reward": -adv * ratio}
    return {k: (v * mask).sum() for k, v in terms.items()}


def grads(policy, ref, old, ids, mask, prompt_len, group, chunk: int) -> dict[str, torch.Tensor]:
    """Per mode the flat gradient of the mean over responses (chunks of whole groups)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    total = {m: torch.zeros(sum(p.numel() for p in params)) for m in DIAG_MODES}
    step = max(group, chunk // group * group)
    for s in range(0, ids.shape[0], step):
        losses = mode_losses(policy, ref, old, ids[s:s + step], mask[s:s + step], prompt_len, group)
        for i, m in enumerate(DIAG_MODES):
            g = torch.autograd.grad(losses[m], params, retain_graph=i < len(DIAG_MODES) - 1,
                                    allow_unused=True)
            total[m] += torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                   for x, p in zip(g, params)])
    return {m: v / ids.shape[0] for m, v in total.items()}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def diagnostic(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.experiments.kl_frontier import TASK
    from system.train import resolve_model

    torch.set_num_threads(1)
    cfg = load_config("configs/debug.yaml", [*TASK, *args.set])
    ref_dir = resolve_model(cfg)
    tok = AutoTokenizer.from_pretrained(ref_dir)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    theta = (AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval() if args.policy
             else moved(ref, args.theta_drift, args.diag_seed))
    old = moved(theta, args.old_drift, args.diag_seed + 1) if args.old_drift > 0 else copy.deepcopy(theta)
    for m in (ref, old):
        m.requires_grad_(False)
    heldout = load_prompt_sets(cfg, tok).heldout
    prompt_len = len(heldout[0]["prompt_ids"])
    max_new, g = cfg.rollout.max_new_tokens, args.group
    many = [r["prompt_ids"] for r in heldout[:max(1, args.ref_samples // g)]]
    batch = [r["prompt_ids"] for r in heldout[:args.diag_prompts]]

    ids, mask = sample(theta, many, g, max_new, eos, pad, args.diag_seed + 2)
    exact = grads(theta, ref, theta, ids, mask, prompt_len, g, 256)["full_seq"]  # on-policy: unbiased
    n_kl = min(256, ids.shape[0])
    with torch.no_grad():
        kl_seq = float(mode_losses(theta, ref, theta, ids[:n_kl], mask[:n_kl], prompt_len, g)["full"]) / n_kl
    ids_b, mask_b = sample(old, batch, g, max_new, eos, pad, args.diag_seed + 3)
    on_batch = grads(theta, ref, old, ids_b, mask_b, prompt_len, g, 256)
    ids_m, mask_m = sample(old, many, g, max_new, eos, pad, args.diag_seed + 4)
    on_many = grads(theta, ref, old, ids_m, mask_m, prompt_len, g, 256)
    # the noise ceiling of the many-sample column: a second, independent estimate of the exact gradient
    ids_c, mask_c = sample(theta, many, g, max_new, eos, pad, args.diag_seed + 5)
    ceiling = cos(grads(theta, ref, theta, ids_c, mask_c, prompt_len, g, 256)["full_seq"], exact)
    share = lambda d: float((d["full_seq"] - d["full"]).norm() / d["full_seq"].norm())  # noqa: E731
    rows = [(m, cos(on_batch[m], exact), cos(on_many[m], exact), float(on_batch[m].norm()))
            for m in DIAG_MODES]
    lines = ["| mode | cosine, fixed batch | cosine, many samples (bias) | gradient norm, batch |",
             "|---|---|---|---|"] + [f"| {m} | {a:.3f} | {b:.3f} | {n:.4g} |" for m, a, b, n in rows]
    text = (
        "\n".join(lines)
        + f"\n\nshare of the KL-to-go term in full_seq's gradient norm ||g_seq - g_full|| / ||g_seq||: "
        f"fixed batch {share(on_batch):.3f}, many samples {share(on_many):.3f}\n"
        f"noise ceiling: cosine of a second, independent on-policy estimate of the exact gradient "
        f"({ids.shape[0]} responses from pi_theta) with it: {ceiling:.3f}\n"
        f"pi_theta: {args.policy or f'pi_ref moved by {args.theta_drift}'}; pi_old: pi_theta moved by "
        f"{args.old_drift}; fixed batch {len(batch)} prompts x {g} responses (mean length "
        f"{float(mask_b.sum(-1).mean()):.1f}); many samples {ids.shape[0]} responses; KL_seq(pi_theta) "
        f"~ {kl_seq:.4f} (on {n_kl} of them)")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostic.json").write_text(json.dumps(
        {"rows": rows, "ceiling": ceiling, "share_batch": share(on_batch), "share_many": share(on_many),
         "text": text}, indent=2))
    return 0
