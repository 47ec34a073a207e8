"""full_seq (system/algo/kl_seq.py) against the sequence KL by exact enumeration on a tabular
autoregressive policy, in float64: the expected gradient of the loss under y ~ pi_old equals
grad KL_seq(theta), where KL_seq = sum_y pi_theta(y) sum_t KL_t(s_t) is enumerated and
differentiated by autograd, not derived. `full`'s error is printed beside it (pytest -s shows it)."""

from __future__ import annotations

import itertools

import pytest
import torch

from system.algo.kl_seq import group_kl_baseline, seq_kl_term, sequence_kl, suffix_sum

F64 = torch.float64
V, T_MAX, EOS = 3, 4, 0  # tokens 0..2; token 0 ends a response; at most T_MAX tokens


def prefixes() -> list[tuple]:
    """Every state: the prefixes of length < T_MAX that contain no EOS."""
    return [p for n in range(T_MAX) for p in itertools.product(range(1, V), repeat=n)]


def responses() -> list[tuple]:
    """Every complete response: ends in EOS, or reaches T_MAX tokens."""
    out = []
    for n in range(1, T_MAX + 1):
        for y in itertools.product(range(V), repeat=n):
            if EOS not in y[:-1] and (y[-1] == EOS or n == T_MAX):
                out.append(y)
    return out


class Tabular:
    """pi(.|s) = softmax(table[s]) for every state s (a prefix), logits [S, V]."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.index = logits, {p: i for i, p in enumerate(prefixes())}

    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, -1)  # [S, V]


def tables(drift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta, old, ref) logits [S, V]: old = theta + drift * noise."""
    g = torch.Generator().manual_seed(seed)
    s = len(prefixes())
    ref = torch.randn(s, V, generator=g, dtype=F64)
    theta = ref + 0.8 * torch.randn(s, V, generator=g, dtype=F64)
    old = theta + drift * torch.randn(s, V, generator=g, dtype=F64)
    return theta, old, ref


def exact_seq_kl(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL_seq(theta) = sum_y pi_theta(y) sum_t KL_t(s_t), enumerated (a function of theta)."""
    pol, rf = Tabular(theta), Tabular(ref)
    lp, lq = pol.logprobs(), rf.logprobs()
    kl_state = (lp.exp() * (lp - lq)).sum(-1)  # [S]
    total = theta.new_zeros(())
    for y in responses():
        states = [pol.index[y[:t]] for t in range(len(y))]
        log_py = sum(lp[s, a] for s, a in zip(states, y))
        total = total + log_py.exp() * sum(kl_state[s] for s in states)
    return total


def batch(theta, old, ref):
    """Every response as one row of a [Y, T_MAX] batch: logp (with grad), old_logp, full_kl (with
    grad), mask, pi_old(y) [Y], and the row's state ids [Y, T_MAX] (-1 off the mask)."""
    pol = Tabular(theta)
    lp, lo, lq = pol.logprobs(), Tabular(old).logprobs(), Tabular(ref).logprobs()
    kl_state = (lp.exp() * (lp - lq)).sum(-1)  # [S]
    ys = responses()
    ids = torch.full((len(ys), T_MAX), -1)
    tok = torch.zeros((len(ys), T_MAX), dtype=torch.long)
    for i, y in enumerate(ys):
        for t in range(len(y)):
            ids[i, t], tok[i, t] = pol.index[y[:t]], y[t]
    mask = ids >= 0
    safe = ids.clamp(min=0)
    logp = torch.where(mask, lp[safe, tok], 0.0)
    old_logp = torch.where(mask, lo[safe, tok], 0.0)
    full_kl = torch.where(mask, kl_state[safe], 0.0)
    p_old = old_logp.sum(-1).exp()  # [Y]
    return logp, old_logp, full_kl, mask.to(F64), p_old, ids


def expected_grad(theta, old, ref, mode: str, state_baseline=None, **kw) -> torch.Tensor:
    """d/dtheta of E_{y~pi_old}[sum_t token loss] for `full` (KL_t) or full_seq (seq_kl_term)."""
    theta = theta.clone().requires_grad_()
    logp, old_logp, full_kl, mask, p_old, ids = batch(theta, old, ref)
    if mode == "full":
        token = full_kl
    else:
        b = None if state_baseline is None else torch.where(ids >= 0, state_baseline[ids.clamp(min=0)], 0.0)
        token, _ = seq_kl_term(full_kl, logp, old_logp, mask, baseline=b, **kw)
    (g,) = torch.autograd.grad((p_old * (token * mask).sum(-1)).sum(), theta)
    return g


def true_grad(theta, ref) -> torch.Tensor:
    theta = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(exact_seq_kl(theta, ref), theta)
    return g


def rel_err(g, want) -> float:
    return float((g - want).norm() / want.norm())


def test_enumeration_sums_to_one_and_seq_kl_is_the_kl_between_responses():
    theta, old, ref = tables(0.5)
    *_, p_old, _ = batch(theta, old, ref)
    assert float(p_old.sum()) == pytest.approx(1.0, abs=1e-13)
    # KL_seq by the chain rule equals KL(pi_theta(y) || pi_ref(y)) over whole responses
    lp, lq, _, mask, _, _ = batch(theta, ref, ref)  # old := ref: old_logp is log pi_ref(y)
    direct = (lp.sum(-1).exp() * (lp.sum(-1) - lq.sum(-1))).sum()
    assert float(exact_seq_kl(theta, ref)) == pytest.approx(float(direct), abs=1e-12)


def test_full_seq_is_exact_on_policy_and_full_is_not():
    theta, _, ref = tables(0.0)
    want = true_grad(theta, ref)
    g_full = expected_grad(theta, theta, ref, "full")
    g_seq = expected_grad(theta, theta, ref, "full_seq")
    b = torch.randn(len(prefixes()), generator=torch.Generator().manual_seed(7), dtype=F64)
    g_seq_b = expected_grad(theta, theta, ref, "full_seq", state_baseline=b)  # any b(s_t)
    errs = {"full": rel_err(g_full, want), "full_seq": rel_err(g_seq, want),
            "full_seq+baseline": rel_err(g_seq_b, want)}
    print(f"\n[on-policy, T_MAX={T_MAX}] relative error of the expected gradient vs grad KL_seq: "
          + ", ".join(f"{k} {v:.3e}" for k, v in errs.items()))
    assert errs["full_seq"] <= 1e-10 and errs["full_seq+baseline"] <= 1e-10
    assert errs["full"] > 0.05


@pytest.mark.parametrize("drift", [0.1, 0.5, 1.0])
def test_full_seq_prefix_ratio_is_exact_at_drift(drift):
    theta, old, ref = tables(drift)
    want = true_grad(theta, ref)
    b = torch.randn(len(prefixes()), generator=torch.Generator().manual_seed(7), dtype=F64)
    errs = {
        "full": rel_err(expected_grad(theta, old, ref, "full"), want),
        "full_seq token": rel_err(expected_grad(theta, old, ref, "full_seq"), want),
        "full_seq prefix": rel_err(expected_grad(theta, old, ref, "full_seq", weighting="prefix"), want),
        "full_seq prefix+baseline": rel_err(expected_grad(theta, old, ref, "full_seq", state_baseline=b,
                                                          weighting="prefix"), want),
        "full_seq prefix cap 2": rel_err(expected_grad(theta, old, ref, "full_seq", weighting="prefix",
                                                       cap=2.0), want),
    }
    print(f"\n[drift {drift}, T_MAX={T_MAX}] relative error of the expected gradient vs grad KL_seq: "
          + ", ".join(f"{k} {v:.3e}" for k, v in errs.items()))
    assert errs["full"] > 0.05
    assert errs["full_seq prefix"] <= 1e-10 and errs["full_seq prefix+baseline"] <= 1e-10


def test_seq_kl_term_value_is_the_weighted_per_state_kl():
    """The score part is 0 in value: token weighting gives `full`'s value; prefix gives rho_<t KL_t."""
    theta, old, ref = tables(0.5)
    logp, old_logp, full_kl, mask, _, _ = batch(theta, old, ref)
    tok, metrics = seq_kl_term(full_kl, logp, old_logp, mask)
    torch.testing.assert_close(tok * mask, full_kl * mask, rtol=0, atol=0)
    pre, metrics_p = seq_kl_term(full_kl, logp, old_logp, mask, weighting="prefix")
    lw = (logp - old_logp) * mask
    rho_before = torch.exp(lw.cumsum(-1) - lw)
    torch.testing.assert_close(pre * mask, rho_before * full_kl * mask, rtol=1e-13, atol=1e-15)
    assert float(metrics_p["prefix_ratio_max"]) == pytest.approx(float((rho_before * mask).max()))
    assert set(metrics) == {"kl_to_go"}
    with pytest.raises(ValueError, match=r"'nope'.*prefix.*token"):
        seq_kl_term(full_kl, logp, old_logp, mask, weighting="nope")


def test_suffix_sum_sequence_kl_and_group_baseline_hand_worked():
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 1.0, 9.0], [3.0, 0.0, 0.0, 0.0], [2.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    to_go = suffix_sum(x, mask)  # strictly after t
    torch.testing.assert_close(to_go * mask, torch.tensor(
        [[14.0, 12.0, 8.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(sequence_kl(x, mask), torch.tensor([15.0, 3.0, 3.0, 4.0]))
    # two groups of two: each row's baseline is the other row's KL-to-go at the same position
    b = group_kl_baseline(x, mask, group_size=2)
    torch.testing.assert_close(b, torch.tensor(
        [[2.0, 1.0, 0.0, 0.0], [14.0, 12.0, 8.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
