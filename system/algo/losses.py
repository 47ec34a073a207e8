"""The GRPO policy loss: PPO clipped surrogate (optional dual clip) plus beta * per-token KL, with the
token aggregation chosen by name.

Every aggregation is ``numerator(token_loss, mask) / normalizer``, where the default normalizer is a
count over the batch given (``loss_normalizer``):

    aggregation               numerator                                   normalizer (count)
    token-mean                sum_{b,t} m*l                               masked tokens
    seq-mean-token-mean       sum_b [ sum_t m*l / max(n_b, 1) ]           sequences with n_b > 0
    seq-mean-token-sum-norm   sum_{b,t} m*l / max_len        (Dr.GRPO)    sequences (B, empty ones too)

(n_b = number of response tokens of sequence b; max_len defaults to mask.shape[1].)

Splitting a batch into shards of whole sequences (data-parallel ranks, minibatches, gradient
accumulation): the numerator is a sum over sequences, so pass every shard the normalizer of the
WHOLE batch,

    normalizer = sum over shards of loss_normalizer(shard_mask, aggregation)    (an all-reduce SUM)

and the shard losses then sum to the whole-batch loss, and their gradients sum to its gradient.
Engines that average gradients over R data-parallel ranks (DDP, DeepSpeed) divide by R, so multiply
each rank's loss by R there. For seq-mean-token-sum-norm also pass the same ``max_len`` everywhere.
Metrics are statistics of the shard given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# log-ratio clamp before exp (as verl): keeps ratio finite, so masked-out garbage never makes inf * 0.
MAX_LOG_RATIO = 20.0


def _token_sum(token_loss, m, max_len):
    return token_loss.sum()


def _seq_token_mean_sum(token_loss, m, max_len):
    n_b = m.sum(dim=-1)  # [B]
    return (token_loss.sum(dim=-1) / n_b.clamp(min=1)).sum()


def _token_sum_over_max_len(token_loss, m, max_len):
    return token_loss.sum() / max_len


@dataclass(frozen=True)
class Aggregation:
    numerator: Callable  # (masked token_loss [B, T], mask [B, T] float, max_len) -> 0-d
    count: Callable  # mask [B, T] float -> 0-d: this shard's share of the normalizer


AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": Aggregation(_token_sum, lambda m: m.sum()),
    "seq-mean-token-mean": Aggregation(_seq_token_mean_sum, lambda m: (m.sum(dim=-1) > 0).to(m.dtype).sum()),
    "seq-mean-token-sum-norm": Aggregation(_token_sum_over_max_len, lambda m: m.new_tensor(float(m.shape[0]))),
}


def _get_aggregation(name: str) -> Aggregation:
    agg = AGGREGATIONS.get(name)
    if agg is None:
        raise ValueError(f"unknown loss aggregation {name!r}; valid: {sorted(AGGREGATIONS)}")
    return agg


def loss_normalizer(mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """This shard's count for ``aggregation`` (0-d float tensor); sum it over shards to get the
    ``normalizer`` that makes shard losses add up to the whole-batch loss. mask: [B, T]."""
    return _get_aggregation(aggregation).count(mask.detach().float())


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce token_loss [B, T] over mask [B, T] to a 0-d loss (see the module docstring)."""
    agg = _get_aggregation(aggregation)
    m = mask.detach().to(token_loss.dtype)  # [B, T]
    masked = torch.where(mask.bool(), token_loss, torch.zeros_like(token_loss))  # [B, T]
    if normalizer is None:
        normalizer = agg.count(m)
    normalizer = torch.as_tensor(normalizer, dtype=token_loss.dtype, device=token_loss.device).clamp(min=1)
    return agg.numerator(masked, m, max_len if max_len is not None else mask.shape[-1]) / normalizer


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: str = "token-mean",
    dual_clip: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
    pg_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate + kl_coef * KL, aggregated by name.

    Per token: ratio = exp(logp - old_logp) (log-ratio clamped to +-20),
        pg = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        dual clip (c = dual_clip > 1, verl): where A < 0, pg = min(pg, -c * A)
        token loss = w * pg + kl_coef * kl       (w = pg_weight, 1 by default)
    then ``aggregate`` (module docstring: aggregations and the normalizer for split batches).

    Args:
        logp: [B, T] log pi_theta of the sampled tokens (with grad).
        old_logp: [B, T] log pi_old of the same tokens (no grad needed; detached here).
        advantages: [B] (broadcast over tokens) or [B, T].
        mask: [B, T], 1 (or True) on response tokens.
        kl: [B, T] per-token KL (``loss_kl``), or None.
        normalizer: whole-batch count when this call sees one shard; default: this batch's count.
        max_len: T_max for seq-mean-token-sum-norm; default mask.shape[1].
        pg_weight: [B, T] per-token weight of the policy-gradient term (no gradient), e.g. the
            truncated or masked importance weight of ``off_policy.rollout_correction``; or None.

    Returns:
        loss: 0-d tensor with grad.
        metrics: detached 0-d float32 tensors (no host sync): pg_loss (aggregated like the loss),
            kl (masked token mean; 0 if kl is None), clip_frac (fraction of tokens where the clipped
            term was the active one), ratio_mean, ratio_min, ratio_max (masked; 1 if no tokens),
            dual_clip_frac (only if dual_clip), tokens (number of masked tokens).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    mask_b = mask.bool()  # [B, T]
    adv = advantages.detach().unsqueeze(-1) if advantages.dim() == 1 else advantages.detach()  # [B, 1] | [B, T]
    log_ratio = (logp - old_logp.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_unclipped = -adv * ratio  # [B, T]
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [B, T]
    metrics = {"clip_frac": _masked_mean(pg_clipped > pg_unclipped, mask_b)}
    if dual_clip is not None:
        pg_floor = -adv * dual_clip  # [B, 1] | [B, T]
        neg = (adv < 0).expand_as(pg)
        metrics["dual_clip_frac"] = _masked_mean(neg & (pg > pg_floor), mask_b)
        pg = torch.where(neg, torch.minimum(pg, pg_floor), pg)
    if pg_weight is not None:
        pg = pg * pg_weight.detach()

    token_loss = pg if kl is None or kl_coef == 0.0 else pg + kl_coef * kl  # [B, T]
    loss = aggregate(token_loss, mask, aggregation, normalizer, max_len)

    ratio_d = ratio.detach().float()
    has_tokens = mask_b.any()
    one = ratio_d.new_tensor(1.0)
    metrics.update(
        pg_loss=aggregate(pg.detach(), mask, aggregation, normalizer, max_len).float(),
        kl=_masked_mean(kl, mask_b) if kl is not None else ratio_d.new_zeros(()),
        ratio_mean=_masked_mean(ratio_d, mask_b),
        ratio_min=torch.where(has_tokens, torch.where(mask_b, ratio_d, float("inf")).amin(), one),
        ratio_max=torch.where(has_tokens, torch.where(mask_b, ratio_d, float("-inf")).amax(), one),
        tokens=mask_b.sum().float(),
    )
    return loss, metrics
