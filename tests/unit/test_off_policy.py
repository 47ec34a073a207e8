"""Off-policy corrections and the decoupled objective against naive float64 references written
from the formulas in system/algo/off_policy.py, token by token."""

import math

import pytest
import torch

from system.algo.losses import grpo_loss
from system.algo.off_policy import CorrectionSettings, rollout_correction

F64 = torch.float64


def _batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    sampler = -torch.rand(B, T, generator=g, dtype=F64) * 3  # log pi_sampler
    prox = sampler + torch.randn(B, T, generator=g, dtype=F64) * 0.8  # log pi_prox
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    return prox, sampler, mask


def _naive_weights(prox, sampler, mask, mode, s):
    """The weight of every token, one at a time, from the formulas."""
    B, T = mask.shape
    w = [[0.0] * T for _ in range(B)]
    corrected = 0
    for b in range(B):
        seq = sum(prox[b, t].item() - sampler[b, t].item() for t in range(T) if mask[b, t])
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = math.exp(prox[b, t].item() - sampler[b, t].item())
            if mode == "none":
                w[b][t] = 1.0
            elif mode == "tis":
                w[b][t] = min(rho, s.cap)
                corrected += rho > s.cap
            else:
                r = math.exp(seq) if s.level == "sequence" else rho
                keep = s.bounds[0] <= r <= s.bounds[1]
                w[b][t] = 1.0 if keep else 0.0
                corrected += not keep
    return torch.tensor(w, dtype=F64), corrected


def _settings(cap=2.0, bounds=(0.5, 2.0), level="token") -> CorrectionSettings:
    return CorrectionSettings(cap, bounds, level)


CASES = [("none", _settings()), ("tis", _settings(cap=2.0)), ("tis", _settings(cap=1.2)),
         ("mis", _settings(bounds=(0.5, 2.0))), ("mis", _settings(bounds=(0.8, 1.25))),
         ("mis", _settings(bounds=(0.2, 5.0), level="sequence"))]


@pytest.mark.parametrize("mode,settings", CASES)
def test_weights_and_metrics_match_the_formulas(mode, settings):
    prox, sampler, mask = _batch()
    weight, metrics = rollout_correction(prox, sampler, mask, mode, settings)
    want, corrected = _naive_weights(prox, sampler, mask, mode, settings)
    assert weight.dtype == F64
    assert torch.allclose(weight, want, atol=1e-12, rtol=0)
    n = int(mask.sum())
    d = [(prox[b, t] - sampler[b, t]).item() for b in range(4) for t in range(6) if mask[b, t]]
    assert metrics["mismatch_logratio_mean"].item() == pytest.approx(sum(abs(x) for x in d) / n, rel=1e-6)
    assert metrics["mismatch_logratio_max"].item() == pytest.approx(max(abs(x) for x in d), rel=1e-6)
    k3 = sum(math.exp(x) - 1 - x for x in d) / n  # KL(sampler || prox), tokens drawn by the sampler
    assert metrics["mismatch_kl"].item() == pytest.approx(k3, rel=1e-6)
    assert metrics["corrected_frac"].item() == pytest.approx(corrected / n)
    assert 0 < corrected < n or mode == "none"  # the cases exercise both sides


def test_equal_policies_need_no_correction():
    _, sampler, mask = _batch()
    for mode in ("tis", "mis"):
        weight, metrics = rollout_correction(sampler.clone(), sampler, mask, mode, _settings())
        assert torch.equal(weight, mask.to(F64))
        assert metrics["corrected_frac"].item() == 0 and metrics["mismatch_kl"].item() == 0


def _naive_decoupled(logp, prox, sampler, adv, mask, cap, eps=0.2):
    """Token-mean of w * max(-r A, -clip(r) A), r = pi_theta / pi_prox, w = min(pi_prox / pi_sampler, C)."""
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            r = torch.exp(logp[b, t] - prox[b, t])
            w = min(math.exp(prox[b, t].item() - sampler[b, t].item()), cap)
            total = total + w * torch.maximum(-r * adv[b], -r.clamp(1 - eps, 1 + eps) * adv[b])
            n += 1
    return total / n


def test_decoupled_objective_value_and_gradient():
    prox, sampler, mask = _batch(1)
    logp = (prox + 0.3 * torch.randn(prox.shape, generator=torch.Generator().manual_seed(2),
                                     dtype=F64)).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    weight, _ = rollout_correction(prox, sampler, mask, "tis", _settings(cap=2.0))
    loss, _ = grpo_loss(logp, prox, adv, mask, pg_weight=weight)
    (grad,) = torch.autograd.grad(loss, logp)
    logp_ref = logp.detach().clone().requires_grad_()
    ref = _naive_decoupled(logp_ref, prox, sampler, adv, mask, cap=2.0)
    (grad_ref,) = torch.autograd.grad(ref, logp_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(grad, grad_ref, atol=1e-12, rtol=0)


def test_unknown_correction_is_named():
    prox, sampler, mask = _batch()
    with pytest.raises(ValueError, match="icepop"):
        rollout_correction(prox, sampler, mask, "icepop", _settings())
