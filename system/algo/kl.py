"""KL(pi_theta || pi_ref): the exact full-vocabulary KL, the per-token sampled estimators, and the
registry that picks a KL mode by name.

Modes (``KL_MODES``; docs/design.md section 1 says why `full` is the default):
    full    exact sum over the vocabulary at every response position (default; needs the reference
            distribution at every position: hidden states + frozen head, or logits)
    full_seq  full plus the score-function term with the analytic KL-to-go: the gradient of the KL
            between whole responses (kl_seq.py has the derivation; the learner adds the term)
    k1      logp - ref_logp at the sampled token
    k2      0.5 * (logp - ref_logp)^2
    k3      exp(ref_logp - logp) - (ref_logp - logp) - 1          (the common GRPO choice)
    k3_is   exp(logp - old_logp) * k3  (importance-weighted; unbiased off-policy, more variance)
    reward  k1 of pi_old as a per-token reward, PPO style (``kl_in_reward``); the loss has no KL term

All per-token tensors are [B, T] (or any shape: functions here are elementwise over leading dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from system.algo.fused_kl import (auto_chunk_size, compute_dtype, fused_logprob_kl,
                                  logprobs_from_hidden)

__all__ = [
    "auto_chunk_size",
    "ESTIMATORS",
    "KL_MODES",
    "KLMode",
    "fused_logprob_kl",
    "full_kl_from_logits",
    "get_kl_mode",
    "kl_in_reward",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "loss_kl",
    "sampled_kl",
]


def full_kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(pi_theta || pi_ref) = sum_v p (log p - log q) over the last dim, materialised.

    For small vocabularies, the ``logits`` transport and cross-checks; the learner uses
    ``fused_logprob_kl``. logits, ref_logits [..., V] -> [...] in fp32 (fp64 if either input is fp64).
    Differentiable through ``logits`` (and ``ref_logits``, if it requires grad).
    """
    cdt = compute_dtype(logits, ref_logits)
    logp = torch.log_softmax(logits.to(cdt) / temperature, dim=-1)  # [..., V]
    logq = torch.log_softmax(ref_logits.to(cdt) / temperature, dim=-1)  # [..., V]
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens]: logits [..., V], tokens [...] int64 -> [...] fp32/fp64."""
    z = logits.to(compute_dtype(logits)) / temperature  # [..., V]
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


# ---------------------------------------------------------------------------------------------
# Sampled estimators at the sampled token. Each maps (logp, ref_logp, old_logp) -> per-token value.


def _k1(logp, ref_logp, old_logp):
    return logp - ref_logp


def _k2(logp, ref_logp, old_logp):
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp, ref_logp, old_logp):
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _k3_is(logp, ref_logp, old_logp):
    if old_logp is None:
        raise ValueError("KL estimator 'k3_is' needs old_logp (log-probs of the sampling policy pi_old)")
    # The ratio is differentiated too: E_{x~pi_old}[ratio * k3] = E_{x~pi_theta}[k3] as a function of theta.
    return torch.exp(logp - old_logp) * _k3(logp, ref_logp, None)


ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3, "k3_is": _k3_is}


def sampled_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) at the sampled token.

    logp, ref_logp, old_logp: [B, T] (any equal shapes) -> [B, T]. Gradient flows through ``logp``.
    k1 = logp - ref_logp; k2 = 0.5 (logp - ref_logp)^2; k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1;
    k3_is = exp(logp - old_logp) * k3 (requires ``old_logp``).
    """
    fn = ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {sorted(ESTIMATORS)}")
    return fn(logp, ref_logp, old_logp)


# ---------------------------------------------------------------------------------------------
# Registry of KL modes.


@dataclass(frozen=True)
class KLMode:
    name: str
    estimator: str | None  # key of ESTIMATORS, None for the exact full-vocabulary KL
    in_loss: bool  # True: beta * KL is a loss term; False: folded into the reward (kl_in_reward)
    sequence: bool = False  # also the KL-to-go score term (kl_seq.seq_kl_term): gradient of the sequence KL


KL_MODES: dict[str, KLMode] = {
    m.name: m
    for m in (
        KLMode("full", estimator=None, in_loss=True),
        KLMode("full_seq", estimator=None, in_loss=True, sequence=True),
        KLMode("k1", estimator="k1", in_loss=True),
        KLMode("k2", estimator="k2", in_loss=True),
        KLMode("k3", estimator="k3", in_loss=True),
        KLMode("k3_is", estimator="k3_is", in_loss=True),
        KLMode("reward", estimator="k1", in_loss=False),
    )
}


def get_kl_mode(name: str) -> KLMode:
    """The KLMode called ``name``; ValueError naming the bad mode and the valid ones."""
    mode = KL_MODES.get(name)
    if mode is None:
        raise ValueError(f"unknown KL mode {name!r}; valid: {sorted(KL_MODES)}")
    return mode


def loss_kl(
    mode: str | KLMode,
    *,
    logp: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The per-token KL term [B, T] that ``grpo_loss`` takes as ``kl`` for this mode, or None when the
    mode puts the KL in the reward. ``full`` and ``full_seq`` return ``full_kl`` (from
    ``fused_logprob_kl``; full_seq's KL-to-go term is ``kl_seq.seq_kl_term`` on top); the estimator
    modes call ``sampled_kl``.
    """
    mode = get_kl_mode(mode) if isinstance(mode, str) else mode
    if not mode.in_loss:
        return None
    if mode.estimator is None:
        if full_kl is None:
            raise ValueError(f"KL mode {mode.name!r} needs full_kl (per-token exact KL from fused_logprob_kl)")
        return full_kl
    if ref_logp is None:
        raise ValueError(f"KL mode {mode.name!r} needs ref_logp")
    return sampled_kl(logp, ref_logp, mode.estimator, old_logp=old_logp)


def kl_in_reward(
    advantages: torch.Tensor,
    k1: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style KL penalty in the reward, applied after the group advantages:

        A[b, t] = advantages[b] - kl_coef * sum_{t' >= t} mask * k1[b, t']

    PPO gives every token the reward -kl_coef * k1_t (k1 = log pi_old - log pi_ref at the sampled
    token, a constant with respect to theta: no gradient), plus the task reward at the end; with no
    critic and gamma = 1 the advantage of token t is the return from t on. The task reward is
    normalised in its group first (GRPO) and the penalty is added unscaled, as OpenRLHF does: were
    it standardised with the rewards (r - kl_coef * sum k1, then divided by the group std), a group
    whose task rewards are all equal would get the standardised -sum k1 whatever kl_coef is.

    Args:
        advantages: [B] group advantages of the task rewards (``group_advantages``).
        k1: [B, T] log pi_old - log pi_ref of the sampled tokens.
        mask: [B, T], 1 on response tokens.
        kl_coef: beta.

    Returns:
        advantages [B, T] (detached, zero off the mask, dtype of ``advantages``), metrics: detached
        0-d tensors ``reward_kl`` (mean per-sequence k1 sum) and ``reward_kl_penalty`` (mean
        penalty at the first response token, kl_coef times that sum).
    """
    k1 = torch.where(mask.bool(), k1.detach(), 0.0)  # [B, T]
    to_go = k1.flip(-1).cumsum(-1).flip(-1)  # [B, T]: sum over t' >= t
    adv = advantages.detach().unsqueeze(-1) - kl_coef * to_go  # [B, T]
    adv = torch.where(mask.bool(), adv, 0.0).to(advantages.dtype)
    seq_kl = to_go[:, 0] if k1.shape[-1] else k1.sum(-1)  # [B]
    return adv, {"reward_kl": seq_kl.mean(), "reward_kl_penalty": (kl_coef * seq_kl).mean()}
