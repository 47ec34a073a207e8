"""grpo_loss: hand-worked clipping cases, aggregations on ragged masks, a naive float64 reference
(values and gradients), and invariance to splitting the batch with the documented normalizer."""

import math

import pytest
import torch

from system.algo.losses import AGGREGATIONS, grpo_loss, loss_normalizer

F64 = torch.float64


def one_token(ratio, adv, **kw):
    """Loss, d loss / d logp and metrics for one sequence with one response token."""
    logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    loss, metrics = grpo_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([adv], dtype=F64), torch.ones(1, 1), **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad.item(), metrics


# (ratio, A, kwargs, expected loss, expected d loss/d logp, clipped?)
# pg = -min(r A, clip(r) A); d(-r A)/d logp = -r A; a clipped token has zero gradient.
HAND_CASES = [
    (1.5, +1.0, {}, -1.2, 0.0, True),  # r > 1 + 0.2, A > 0: -min(1.5, 1.2) = -1.2, clipped
    (0.5, -1.0, {}, 0.8, 0.0, True),  # r < 1 - 0.2, A < 0: -min(-0.5, -0.8) = 0.8, clipped
    (0.5, +1.0, {}, -0.5, -0.5, False),  # r < 0.8 but A > 0: the pessimistic term is the unclipped one
    (1.5, -1.0, {}, 1.5, 1.5, False),  # r > 1.2 but A < 0: unclipped, loss grows with r
    (1.1, +2.0, {}, -2.2, -2.2, False),  # inside the trust region
    (1.25, +1.0, {"clip_high": 0.28}, -1.25, -1.25, False),  # clip-higher (DAPO): 1.25 < 1.28
    (1.25, +1.0, {"clip_high": 0.28, "clip_low": 0.1}, -1.25, -1.25, False),
    (0.85, -1.0, {"clip_low": 0.1}, 0.9, 0.0, True),  # r < 0.9, A < 0: -min(-0.85, -0.9) = 0.9
    # dual clip c = 3 (A < 0 only): pg = min(pg, -c A) = min(pg, 3)
    (5.0, -1.0, {"dual_clip": 3.0}, 3.0, 0.0, False),  # pg = 5 -> 3, zero gradient
    (2.0, -1.0, {"dual_clip": 3.0}, 2.0, 2.0, False),  # pg = 2 < 3: unchanged
    (5.0, +1.0, {"dual_clip": 3.0}, -1.2, 0.0, True),  # A > 0: dual clip does not apply
]


@pytest.mark.parametrize("ratio,adv,kw,expected,expected_grad,clipped", HAND_CASES)
def test_hand_worked_clipping(ratio, adv, kw, expected, expected_grad, clipped):
    loss, grad, metrics = one_token(ratio, adv, **kw)
    assert loss == pytest.approx(expected, abs=1e-12)
    assert grad == pytest.approx(expected_grad, abs=1e-12)
    assert metrics["clip_frac"].item() == (1.0 if clipped else 0.0)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio)


def test_dual_clip_frac():
    _, _, metrics = one_token(5.0, -1.0, dual_clip=3.0)
    assert metrics["dual_clip_frac"].item() == 1.0
    _, _, metrics = one_token(2.0, -1.0, dual_clip=3.0)
    assert metrics["dual_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(1.0, 1.0, dual_clip=1.0)


# Ragged batch: ratio 1 everywhere, so the token pg loss is -A.
#   row 0: 3 tokens, A = 1, 2, 3 ; row 1: 1 token, A = 4 ; row 2: no tokens.
RAGGED_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
RAGGED_ADV = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4])


@pytest.mark.parametrize(
    "aggregation,kw,expected",
    [
        ("token-mean", {}, -(1 + 2 + 3 + 4) / 4),  # -2.5
        ("seq-mean-token-mean", {}, -(2.0 + 4.0) / 2),  # row means -2, -4; empty row excluded: -3
        ("seq-mean-token-sum-norm", {}, -10 / (3 * 4)),  # sum / (B * T_max), T_max = mask.shape[1]
        ("seq-mean-token-sum-norm", {"max_len": 8}, -10 / (3 * 8)),
    ],
)
def test_aggregations_on_ragged_mask(aggregation, kw, expected):
    logp = torch.zeros(3, 4)
    logp[RAGGED_MASK == 0] = 1e4  # garbage on padding must not leak (log-ratio clamp + masking)
    logp.requires_grad_()
    loss, metrics = grpo_loss(logp, torch.zeros(3, 4), RAGGED_ADV, RAGGED_MASK, aggregation=aggregation, **kw)
    assert loss.item() == pytest.approx(expected)
    assert metrics["pg_loss"].item() == pytest.approx(expected)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.all(logp.grad[RAGGED_MASK == 0] == 0)
    assert metrics["tokens"].item() == 4
    assert metrics["ratio_min"].item() == metrics["ratio_max"].item() == 1.0


def test_kl_term_and_metrics():
    mask = RAGGED_MASK
    kl = torch.tensor([[0.1, 0.2, 0.3, 50.0], [0.4, 50.0, 50.0, 50.0], [50.0] * 4])
    loss, metrics = grpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), RAGGED_ADV, mask, kl, kl_coef=0.5)
    assert metrics["kl"].item() == pytest.approx(0.25)  # masked mean of 0.1..0.4
    assert loss.item() == pytest.approx(-2.5 + 0.5 * 0.25)
    assert metrics["pg_loss"].item() == pytest.approx(-2.5)
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def test_empty_mask_gives_zero_loss_and_finite_metrics():
    loss, metrics = grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_unknown_aggregation():
    with pytest.raises(ValueError, match=r"'mean'.*token-mean"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), aggregation="mean")


# ------------------------------------------------------------------ naive reference and splitting


def naive_grpo(logp, old, adv, mask, kl, clip_low, clip_high, kl_coef, aggregation, dual_clip):
    """Loops over tokens in float64."""
    B, T = mask.shape
    per_seq, total, n_tok = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            r = torch.exp(logp[b, t] - old[b, t])
            pg = -torch.minimum(r * a, torch.clamp(r, 1 - clip_low, 1 + clip_high) * a)
            if dual_clip is not None and a < 0:
                pg = torch.minimum(pg, -dual_clip * a)
            s, n = s + pg + kl_coef * kl[b, t], n + 1
        total, n_tok = total + s, n_tok + n
        if n > 0:
            per_seq.append(s / n)
    if aggregation == "token-mean":
        return total / n_tok
    if aggregation == "seq-mean-token-mean":
        return sum(per_seq) / len(per_seq)
    return total / (B * T)


def random_batch(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # ragged, one empty row
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)  # ratios well outside [0.8, 1.2] too
    adv = torch.randn(B, generator=g, dtype=F64)
    kl = torch.rand(B, T, generator=g, dtype=F64)
    return logp, old, adv, mask, kl


KW = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.3, dual_clip=3.0)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_matches_naive_values_and_grads(aggregation):
    logp, old, adv, mask, kl = random_batch(0)
    lp1, kl1 = logp.clone().requires_grad_(), kl.clone().requires_grad_()
    loss, _ = grpo_loss(lp1, old, adv, mask, kl1, aggregation=aggregation, **KW)
    loss.backward()
    lp2, kl2 = logp.clone().requires_grad_(), kl.clone().requires_grad_()
    ref = naive_grpo(lp2, old, adv, mask, kl2, aggregation=aggregation, **KW)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(lp1.grad, lp2.grad)
    torch.testing.assert_close(kl1.grad, kl2.grad)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("split", [3, 2])  # halves [0:3] + [3:6]; uneven [0:2] + [2:6]
def test_split_batch_equals_whole(aggregation, split):
    logp, old, adv, mask, kl = random_batch(1)
    adv_bt = adv[:, None].expand(-1, mask.shape[1])  # also exercise [B, T] advantages
    whole_lp = logp.clone().requires_grad_()
    whole, _ = grpo_loss(whole_lp, old, adv_bt, mask, kl, aggregation=aggregation, **KW)
    whole.backward()

    shards = [slice(0, split), slice(split, None)]
    normalizer = sum(loss_normalizer(mask[s], aggregation) for s in shards)  # all-reduce SUM across ranks
    parts_lp = logp.clone().requires_grad_()
    total = 0.0
    for s in shards:
        part, _ = grpo_loss(
            parts_lp[s], old[s], adv_bt[s], mask[s], kl[s], aggregation=aggregation, normalizer=normalizer, **KW
        )
        part.backward()  # gradient accumulation
        total = total + part.detach()
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(parts_lp.grad, whole_lp.grad)
    assert normalizer.item() == loss_normalizer(mask, aggregation).item()
