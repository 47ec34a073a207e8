"""Off-policy samples: which policy is pi_old, and the correction for the sampler/learner mismatch
(docs/design.md section 5 places it in the whole).

Three policies meet in an update on a sample drawn k versions ago:

    pi_sampler  what drew the tokens, as the rollout engine reports it (its own numerics: vLLM or
                HF generate, maybe bf16, maybe k policy versions old)
    pi_prox     the learner's own policy at the start of this update ("proximal"; one forward pass)
    pi_theta    the policy being updated (gradient)

``algo.pi_old`` chooses the denominator of the clipped ratio:

    sampler   r = pi_theta / pi_sampler. The textbook importance ratio for a sample drawn by
              pi_sampler; no learner forward. With k > 1 the sampler is far from pi_theta, r sits
              outside [1 - eps, 1 + eps] from the first minibatch on and clipping throws most
              tokens' gradient away.
    proximal  the decoupled objective (Hilton et al. 2021, "Batch size-invariance for policy
              optimization"; AReaL's decoupled PPO): clip against pi_prox, which is at most one
              update from pi_theta, and carry the off-policyness in a separate importance weight,

                  L_t = w_t * max(-r_t A, -clip(r_t, 1 - eps_low, 1 + eps_high) A),
                  r_t = pi_theta / pi_prox,    w_t = pi_prox / pi_sampler (no gradient),

              whose expectation under pi_sampler is that of the clipped objective under pi_prox.
              w_t is what ``algo.rollout_correction`` turns into a weight (below): `tis` truncates
              it, `mis` keeps only tokens where it is near 1 (AReaL's behav_imp_weight_cap drops
              the tokens above its cap: an upper-only mis), `none` drops it (pi_prox is then
              trusted as the sampler: verl's recompute default).
              Cost: one no-grad learner forward over the batch per update, which sampler mode
              skips when the sample carries the sampler's log-probs.

The same weight corrects the mismatch between the sampler's and the learner's numerics at equal
weights (k = 0), the case TIS and MIS were written for (verl, slime, OpenRLHF): one formula, two
causes. ``algo.rollout_correction`` (a per-token weight on the policy-gradient term only; the KL
term is untouched):

    none   w = 1
    tis    truncated IS, per token:  w_t = min(exp(d_t), C),   d_t = log pi_prox - log pi_sampler
           (C = algo.tis_cap; 2 as verl's default rollout_is_threshold)
    mis    masked IS ("icepop"): w_t = 1 if lo <= rho <= hi else 0, [lo, hi] = algo.mis_bounds;
           rho = exp(d_t) per token (algo.mis_level=token), or the sequence's product
           exp(sum_t d_t) for every token of it (sequence): the whole response is kept or dropped

The full-vocabulary KL needs no change: sum_v pi_theta(v|s) log(pi_theta(v|s) / pi_ref(v|s)) is
exact at every state whatever drew it. Its limit: the states s are still the sampler's, so the
mean over visited states weighs them by the old policy's state distribution, not pi_theta's.

Mismatch statistics (every step where pi_prox is computed), over response tokens:
    mismatch_logratio_mean / _max   mean / max of |d_t|
    mismatch_kl                     k3 estimate of KL(pi_sampler || pi_prox): E[exp(d) - 1 - d],
                                    unbiased because the tokens were drawn by pi_sampler
    corrected_frac                  fraction of tokens whose weight is not exp(d_t): truncated (tis)
                                    or masked (mis); 0 for none

Shapes: [B, T] per-token tensors with a [B, T] mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from system.algo.losses import MAX_LOG_RATIO  # the clamp before exp, as in the ratio

PI_OLD = ("sampler", "proximal")


@dataclass(frozen=True)
class CorrectionSettings:  # algo.tis_cap, algo.mis_bounds, algo.mis_level (their defaults: system/config.py)
    cap: float  # tis: C
    bounds: tuple  # mis: [lo, hi]
    level: str  # mis: token | sequence


def _none(d, mask, s):
    return torch.ones_like(d), torch.zeros_like(mask)


def _tis(d, mask, s):
    ratio = torch.exp(d)  # [B, T]
    return ratio.clamp(max=s.cap), mask & (ratio > s.cap)


def _mis(d, mask, s):
    if s.level == "sequence":
        seq = torch.where(mask, d, 0.0).sum(dim=-1, keepdim=True).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        d = seq.expand_as(d)  # [B, T]: every token carries its sequence's log ratio
    ratio = torch.exp(d)  # [B, T]
    lo, hi = s.bounds
    keep = (ratio >= lo) & (ratio <= hi)
    return keep.to(d.dtype), mask & ~keep


CORRECTIONS: dict[str, Callable] = {"none": _none, "tis": _tis, "mis": _mis}
MIS_LEVELS = ("token", "sequence")


def rollout_correction(
    prox_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    settings: CorrectionSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token weight of the policy-gradient term, and the mismatch statistics.

    Args:
        prox_logp: [B, T] log pi_prox of the sampled tokens (the learner before this update).
        sampler_logp: [B, T] log pi_sampler of the same tokens (what the rollout engine reported).
        mask: [B, T], 1 (or True) on response tokens.
        mode: none | tis | mis (module docstring); settings: C, [lo, hi] and the mis level.

    Returns:
        weight [B, T] (detached, 0 off the mask, dtype of prox_logp), metrics: detached 0-d
        tensors mismatch_logratio_mean, mismatch_logratio_max, mismatch_kl, corrected_frac.
    """
    fn = CORRECTIONS.get(mode)
    if fn is None:
        raise ValueError(f"unknown rollout correction {mode!r}; valid: {sorted(CORRECTIONS)}")
    m = mask.bool()  # [B, T]
    d = torch.where(m, prox_logp.detach() - sampler_logp.detach(), 0.0)  # [B, T]
    d = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    weight, corrected = fn(d, m, settings)
    weight = torch.where(m, weight, 0.0).to(prox_logp.dtype)
    n = m.sum().clamp(min=1)
    metrics = {
        "mismatch_logratio_mean": d.abs().sum() / n,
        "mismatch_logratio_max": d.abs().amax() if d.numel() else d.new_zeros(()),
        "mismatch_kl": torch.where(m, torch.exp(d) - 1.0 - d, 0.0).sum() / n,
        "corrected_frac": corrected.sum() / n,
    }
    return weight, {k: v.float() for k, v in metrics.items()}
