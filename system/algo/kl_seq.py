"""The sequence KL (algo.kl.mode=full_seq): the gradient of the KL between whole responses, built on
the per-state exact KL that ``fused_logprob_kl`` already gives at every response position.

Derivation. With s_t = (q, a_<t) and KL_t(s) = KL(pi_theta(.|s) || pi_ref(.|s)) over the vocabulary,

    KL_seq(theta) = E_{y~pi_theta}[ sum_t KL_t(s_t) ]        (= KL(pi_theta(y|q) || pi_ref(y|q)))
    grad KL_seq   = E[ sum_t grad KL_t(s_t) ]  +  E[ sum_t grad log pi_theta(a_t|s_t) * G_t ],
    G_t           = sum_{t' > t} KL_t'(s_t')    (the analytic KL-to-go; KL_t' depends on a_t for t' > t)

`full` keeps the first sum only. Samples come from pi_old (or a sampler k versions old). Writing
rho_<t = prod_{i<t} pi_theta(a_i|s_i) / pi_b(a_i|s_i) for the prefix ratio against the policy pi_b that
drew the tokens, importance sampling gives KL_seq(theta) = E_{y~pi_b}[ sum_t rho_<t(theta) KL_t(s_t) ]
exactly, and differentiating that (grad rho_<t = rho_<t sum_{i<t} grad log pi_i) gives

    grad KL_seq = E_{pi_b}[ sum_t rho_<t grad KL_t  +  sum_t grad log pi_t * (R_t - rho_<=t b_t) ],
    R_t         = sum_{t' > t} rho_<t' KL_t'        (the prefix-weighted KL-to-go)

for any baseline b_t that does not depend on a_t:
E_{pi_b}[rho_<=t grad log pi_t b_t] = E_{s_t~pi_theta}[b_t E_{a_t~pi_theta}[grad log pi_t]] = 0.
On-policy (pi_b = pi_theta in value) every rho is 1 and this is the first formula.

What the loss does. ``seq_kl_term`` returns a per-token surrogate that ``grpo_loss`` takes as its
``kl`` (times beta), whose value is the per-state KL (as `full`) and whose gradient is the above:

    surrogate_t = w_t KL_t + (log pi_t - sg(log pi_t)) * sg(S_t)          (the second part is 0 in value)

    weighting (algo.kl.seq_weight, ``SEQ_WEIGHTS``):
      token    w_t = 1,        S_t = c_t r_t (G_t - b_t),  r_t = pi_theta / pi_old of token t
               Exact on-policy (r = 1); off-policy it is PPO's approximation for an advantage: only
               the token's own ratio, the states' distribution left as sampled. By enumeration
               (tests/unit/test_kl_seq.py) that can be further from grad KL_seq than `full` at
               large drift; and, unclipped, r_t is bounded only by the log-ratio clamp.
      prefix   w_t = rho_<t,   S_t = R_t - rho_<=t b_t,  every rho truncated at algo.kl.prefix_cap
               Exact at any drift without the cap (0); the cap trades that for bounded variance.

Decisions.
- Clipping: the KL-to-go term does not go through the clipped ratio (nor does the per-state term,
  as in `full`). Clipping is PPO's trust region for the reward advantage; on a regulariser's exact
  gradient it would zero the gradient of exactly the tokens that moved furthest. The unclipped ratio
  is bounded by the log-ratio clamp (losses.MAX_LOG_RATIO) like every ratio here.
- Baseline (``SEQ_BASELINES``, algo.kl.baseline): `group` (default) is, for response i of a group
  at position t, the mean over the group's OTHER responses of their k1 KL-to-go
  sum_{t'>t} (log pi_old - log pi_ref)(a_t') at the same position (0 past their end). It comes from
  other samples, so it does not depend on a_t; it is computed by the driver, where groups are whole,
  from the k1 the learners already return (``group_kl_baseline``); it is not pi_theta's, which only
  costs variance. `none`: b = 0. A baseline formed on a rank (other rows of its shard) would make
  the gradient depend on how rows are split over ranks; this one does not.
- Aggregation: the objective must be the sequence KL, a per-sequence SUM over tokens divided by a
  constant. token-mean (sum / the minibatch's token count) and seq-mean-token-sum-norm
  (sum / (B * max_len)) are that; seq-mean-token-mean divides each response by its own length
  (a per-sequence mean: short responses' KL counts more per token) and is rejected by validate().
- pi_old=proximal: r_t is pi_theta / pi_prox, as in the clipped term, and under `token` weighting
  c_t is the same rollout-correction weight (tis/mis of pi_prox / pi_sampler) that the policy-gradient
  term gets (1 with `none` and with pi_old=sampler): the KL-to-go is treated like an advantage.
  Under `prefix` weighting the ratios are taken against the sampler's own log-probs when the sample
  carries them (pi_b = pi_sampler: the exact state correction), and c_t is not used (the prefix
  ratio already is the correction).

Every tensor is [B, T] with a [B, T] mask (1 on response tokens, each row's tokens contiguous).
Sequences stay whole on one rank, so nothing here needs another rank's rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from system.algo.losses import MAX_LOG_RATIO

SEQ_BASELINES = ("group", "none")


def suffix_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{t' > t} mask * x[b, t'] (strictly after t): [B, T] -> [B, T], detached."""
    x = torch.where(mask.bool(), x.detach(), 0.0)  # [B, T]
    return x.flip(-1).cumsum(-1).flip(-1) - x


def sequence_kl(full_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response sum_t KL_t: full_kl, mask [B, T] -> [B] (detached)."""
    return torch.where(mask.bool(), full_kl.detach(), 0.0).sum(-1)


def _token(log_w, mask, kl, to_go, baseline, ratio, weight, cap):
    s = weight * ratio * (to_go - baseline)  # [B, T]
    return torch.ones_like(kl), s, {}


def _prefix(log_w, mask, kl, to_go, baseline, ratio, weight, cap):
    lw = torch.where(mask.bool(), log_w, 0.0)
    upto = lw.cumsum(-1).clamp(max=MAX_LOG_RATIO)  # [B, T]: log rho_<=t
    before = (upto - lw).clamp(max=MAX_LOG_RATIO)  # [B, T]: log rho_<t
    rho_before, rho_upto = torch.exp(before), torch.exp(upto)
    if cap > 0:
        rho_before, rho_upto = rho_before.clamp(max=cap), rho_upto.clamp(max=cap)
    r_to_go = suffix_sum(rho_before * kl, mask)  # [B, T]: R_t = sum_{t'>t} rho_<t' KL_t'
    m = mask.bool()
    stats = {"prefix_ratio_max": torch.where(m, rho_before, 0.0).amax() if m.any() else kl.new_ones(())}
    return rho_before, r_to_go - rho_upto * baseline, stats


# name -> (log_w, mask, kl, G, baseline, ratio, weight, cap) -> (w [B, T], S [B, T], metrics)
SEQ_WEIGHTS: dict[str, Callable] = {"token": _token, "prefix": _prefix}


def seq_kl_term(
    full_kl: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    baseline: torch.Tensor | None = None,
    weighting: str = "token",
    cap: float = 0.0,
    sampler_logp: torch.Tensor | None = None,
    pg_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token KL term of full_seq (module docstring): value w_t KL_t, gradient that of KL_seq.

    Args:
        full_kl: [B, T] exact per-state KL_t (with grad, from ``fused_logprob_kl``).
        logp: [B, T] log pi_theta of the sampled tokens (with grad).
        old_logp: [B, T] log pi_old (pi_prox under algo.pi_old=proximal): the ratio of `token`.
        mask: [B, T], 1 on response tokens.
        baseline: [B, T] b_t, independent of a_t (``group_kl_baseline``), or None (0).
        weighting: ``SEQ_WEIGHTS`` key: token | prefix.
        cap: prefix: truncate every rho at cap; 0: no cap (exact).
        sampler_logp: [B, T] log-probs of the policy that drew the tokens (prefix); default old_logp.
        pg_weight: [B, T] the rollout-correction weight of the pg term (token); default 1.

    Returns:
        surrogate [B, T] (pass as ``kl`` to ``grpo_loss``), metrics: detached 0-d tensors kl_to_go
        (masked token mean of G_t) and, for prefix, prefix_ratio_max.
    """
    fn = SEQ_WEIGHTS.get(weighting)
    if fn is None:
        raise ValueError(f"unknown sequence-KL weighting {weighting!r}; valid: {sorted(SEQ_WEIGHTS)}")
    m = mask.bool()  # [B, T]
    to_go = suffix_sum(full_kl, mask)  # [B, T]: G_t, detached
    b = torch.zeros_like(to_go) if baseline is None else torch.where(m, baseline.detach(), 0.0)
    lp = logp.detach()
    log_ratio = (lp - old_logp.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    behaviour = old_logp if sampler_logp is None else sampler_logp
    log_w = (lp - behaviour.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    weight = torch.ones_like(lp) if pg_weight is None else pg_weight.detach()
    w, s, stats = fn(log_w, m, full_kl.detach(), to_go, b, torch.exp(log_ratio), weight, cap)
    score = (logp - lp) * torch.where(m, s, 0.0)  # [B, T]: 0 in value, grad log pi_t * S_t
    surrogate = w.detach() * full_kl + score
    n = m.sum().clamp(min=1)
    stats["kl_to_go"] = torch.where(m, to_go, 0.0).sum() / n
    return surrogate, {k: v.detach().float() for k, v in stats.items()}


def group_kl_baseline(k1: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """The `group` baseline: for response i at position t, the mean over the other responses j of
    its group of sum_{t'>t} mask_j * k1_j[t'] (k1 = log pi_old - log pi_ref of the sampled tokens).

    k1, mask: [N, T] with the N = P * group_size rows in groups of consecutive rows -> [N, T]
    (detached, 0 off the mask). Needs group_size >= 2.
    """
    n, t = k1.shape
    to_go = suffix_sum(k1, mask).view(n // group_size, group_size, t)  # [P, G, T]
    others = (to_go.sum(1, keepdim=True) - to_go) / (group_size - 1)  # [P, G, T]: leave one out
    return torch.where(mask.bool(), others.reshape(n, t), 0.0)
