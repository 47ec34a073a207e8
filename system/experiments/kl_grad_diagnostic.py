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

    draw = lambda model, prompts, seed: sample(model, prompts, g, max_new, eos, pad, seed)  # noqa: E731
    grad_all = lambda ids_mask, pi_old: grads(theta, ref, pi_old, *ids_mask, prompt_len, g, 256)  # noqa: E731
    d1, d2 = draw(theta, many, args.diag_seed + 2), draw(theta, many, args.diag_seed + 3)
    e1, e2 = grad_all(d1, theta), grad_all(d2, theta)  # on-policy: full_seq is unbiased
    exact = (e1["full_seq"] + e2["full_seq"]) / 2
    o_batch = draw(old, batch, args.diag_seed + 4)
    on_batch = grad_all(o_batch, old)
    m1 = grad_all(draw(old, many, args.diag_seed + 5), old)
    m2 = grad_all(draw(old, many, args.diag_seed + 6), old)
    with torch.no_grad():
        n_kl = min(256, d1[0].shape[0])
        losses = mode_losses(theta, ref, theta, d1[0][:n_kl], d1[1][:n_kl], prompt_len, g)
        kl_seq = float(losses["full"]) / n_kl

    def debiased_cos(m: str) -> float:
        """cos(E[g_m], E[g_exact]) from independent draws: inner products of independent estimates
        are unbiased for the inner products of the means, so the sampling noise drops out."""
        q1, q2 = e1["full_seq"], e2["full_seq"]
        num = (m1[m] @ q2 + m2[m] @ q1) / 2
        den = (m1[m] @ m2[m]).clamp(min=1e-30).sqrt() * (q1 @ q2).clamp(min=1e-30).sqrt()
        return float(num / den)

    s1, s2 = m1["full_seq"] - m1["full"], m2["full_seq"] - m2["full"]  # the KL-to-go term's part
    share_many = float(((s1 @ s2).clamp(min=0) / (m1["full_seq"] @ m2["full_seq"])).sqrt())
    share_batch = float((on_batch["full_seq"] - on_batch["full"]).norm() / on_batch["full_seq"].norm())
    rows = [(m, cos(on_batch[m], exact), cos(m1[m], exact), debiased_cos(m)) for m in DIAG_MODES]
    n_many = d1[0].shape[0]
    lines = ["| mode | cosine, fixed batch | cosine, many samples | cosine of expectations (noise removed) |",
             "|---|---|---|---|"] + [f"| {m} | {a:.3f} | {b:.3f} | {c:.4f} |" for m, a, b, c in rows]
    text = (
        "\n".join(lines)
        + f"\n\nshare of the KL-to-go term in full_seq's gradient norm ||g_seq - g_full|| / ||g_seq||: "
        f"fixed batch {share_batch:.3f}; of the expectations (noise removed) {share_many:.3f}\n"
        f"noise ceiling of the many-sample column: cosine of two independent on-policy estimates of "
        f"the exact gradient ({n_many} responses each): {cos(e1['full_seq'], e2['full_seq']):.3f}\n"
        f"pi_theta: {args.policy or f'pi_ref moved by {args.theta_drift}'}; pi_old: pi_theta moved by "
        f"{args.old_drift}; fixed batch {len(batch)} prompts x {g} responses (mean length "
        f"{float(o_batch[1].sum(-1).mean()):.1f}); many samples: {n_many} responses per draw on "
        f"{len(many)} held-out prompts, exact = mean of two on-policy full_seq draws; "
        f"KL_seq(pi_theta) ~ {kl_seq:.4f} (on {n_kl} responses)")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostic.json").write_text(json.dumps(
        {"rows": rows, "share_batch": share_batch, "share_many": share_many, "text": text}, indent=2))
    return 0
