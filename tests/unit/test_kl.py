"""KL: exact full-vocabulary KL (materialised and fused/chunked) against naive float64 references,
gradients against autograd of the naive version, the sampled estimators and the mode registry."""

import math

import pytest
import torch

from system.algo.kl import (
    ESTIMATORS,
    KL_MODES,
    auto_chunk_size,
    fused_logprob_kl,
    full_kl_from_logits,
    get_kl_mode,
    kl_in_reward,
    logprobs_from_hidden,
    logprobs_from_logits,
    loss_kl,
    sampled_kl,
)

F64 = torch.float64


def naive_kl(logits, ref_logits):
    """sum_v p log(p / q), float64, written from the definition."""
    p = torch.softmax(logits.double(), -1)
    q = torch.softmax(ref_logits.double(), -1)
    return (p * torch.log(p / q)).sum(-1)


def naive_logp(logits, tokens):
    p = torch.softmax(logits.double(), -1)
    return torch.log(p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))


def naive_entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p)).sum(-1)


def make_inputs(n=48, h=16, h_ref=12, v=96, dtype=torch.float32, tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    if tied:
        ref_hidden, ref_weight = (hidden.float() + 0.3 * torch.randn(n, h, generator=g)).to(dtype), weight
    else:
        ref_hidden = torch.randn(n, h_ref, generator=g).to(dtype)
        ref_weight = (torch.randn(v, h_ref, generator=g) * 0.5).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, ref_hidden, ref_weight, tokens


# ------------------------------------------------------------------ materialised logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_full_kl_from_logits_matches_naive(dtype):
    torch.manual_seed(0)
    z, zr = torch.randn(3, 5, 40).to(dtype), torch.randn(3, 5, 40).to(dtype)
    kl = full_kl_from_logits(z, zr)
    assert kl.shape == (3, 5) and kl.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(kl.double(), naive_kl(z, zr), rtol=1e-5, atol=1e-6)
    assert torch.all(full_kl_from_logits(z, z).abs() < 1e-6)


def test_full_kl_from_logits_grad_matches_naive():
    torch.manual_seed(1)
    z = torch.randn(6, 30, dtype=F64, requires_grad=True)
    zr = torch.randn(6, 30, dtype=F64)
    w = torch.randn(6, dtype=F64)
    (g,) = torch.autograd.grad((full_kl_from_logits(z, zr) * w).sum(), z)
    (g_ref,) = torch.autograd.grad((naive_kl(z, zr) * w).sum(), z)
    torch.testing.assert_close(g, g_ref)
    # closed form: dKL/dz_v = p_v ((log p_v - log q_v) - KL)
    p, logp, logq = torch.softmax(z, -1), torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    kl = naive_kl(z, zr).unsqueeze(-1)
    torch.testing.assert_close(g, (w.unsqueeze(-1) * p * (logp - logq - kl)).detach())


def test_logprobs_from_logits_and_temperature():
    torch.manual_seed(2)
    z, tok = torch.randn(4, 7, 33), torch.randint(0, 33, (4, 7))
    tol = dict(rtol=1e-6, atol=1e-6)  # float32 results against a float64 reference
    torch.testing.assert_close(logprobs_from_logits(z, tok).double(), naive_logp(z, tok), **tol)
    torch.testing.assert_close(logprobs_from_logits(z, tok, temperature=0.6).double(), naive_logp(z / 0.6, tok), **tol)


# ------------------------------------------------------------------ fused, chunked


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 48, 1000])  # 16 and 48 divide N = 48; 7 does not
def test_fused_matches_materialised(chunk_size, dtype, tied):
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(dtype=dtype, tied=tied)
    logp, kl, ent = fused_logprob_kl(
        hidden, weight, ref_hidden, ref_weight, tokens, chunk_size=chunk_size, return_entropy=True
    )
    assert logp.dtype == kl.dtype == ent.dtype == torch.float32 and logp.shape == (48,)
    # The reference materialises logits from the same (upcast) inputs, then computes in float64.
    z = hidden.double() @ weight.double().T
    zr = ref_hidden.double() @ ref_weight.double().T
    torch.testing.assert_close(kl.double(), naive_kl(z, zr), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), naive_logp(z, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), naive_entropy(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, full_kl_from_logits(hidden.float() @ weight.float().T, zr.float()), rtol=1e-4, atol=1e-5)


def test_auto_chunk_size_keeps_one_buffer_at_2_to_the_25_elements(monkeypatch):
    assert auto_chunk_size(32768) == 1024  # the size the benchmark tuned
    assert auto_chunk_size(151936) == 220  # Qwen's vocabulary: 220 x 151936 <= 2**25
    assert auto_chunk_size(2**26) == 1  # never zero rows
    from system.algo import fused_kl

    monkeypatch.setattr(fused_kl, "CHUNK_ELEMENTS", 96 * 5)  # V = 96 -> 5 rows per chunk here
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs()
    auto = fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens)  # chunk_size=None
    fixed = fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens, chunk_size=5)
    for a, b in zip(auto, fixed):
        assert torch.equal(a, b)
    assert torch.equal(logprobs_from_hidden(hidden, weight, tokens),
                       logprobs_from_hidden(hidden, weight, tokens, chunk_size=5))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens, chunk_size=-1)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [7, 16])
def test_fused_grads_match_naive_autograd(chunk_size, dtype, tied):
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(dtype=dtype, tied=tied)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(48, generator=g), torch.randn(48, generator=g)  # arbitrary upstream grads

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rh = ref_hidden.clone().requires_grad_()  # must get no gradient
    logp, kl = fused_logprob_kl(h, w, rh, ref_weight, tokens, chunk_size=chunk_size)
    (a * logp + b * kl).sum().backward()
    assert rh.grad is None or torch.all(rh.grad == 0)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    z, zr = h64 @ w64.T, ref_hidden.double() @ ref_weight.double().T
    (a.double() * naive_logp(z, tokens) + b.double() * naive_kl(z, zr)).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


def test_fused_gradcheck_float64_with_temperature():
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(n=11, h=5, h_ref=4, v=13, dtype=F64)
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(h, w):
        return fused_logprob_kl(h, w, ref_hidden, ref_weight, tokens, chunk_size=4, temperature=0.7)

    assert torch.autograd.gradcheck(fn, (hidden, weight))
    logp, kl = fn(hidden, weight)
    assert logp.dtype == F64
    z, zr = hidden @ weight.T / 0.7, ref_hidden @ ref_weight.T / 0.7
    torch.testing.assert_close(kl, naive_kl(z, zr))
    torch.testing.assert_close(logp, naive_logp(z, tokens))


@pytest.mark.parametrize("use", ["logp", "kl"])
def test_fused_single_output_used(use):
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(n=20, dtype=F64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, kl = fused_logprob_kl(h, w, ref_hidden, ref_weight, tokens, chunk_size=6)
    (logp if use == "logp" else kl).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z, zr = h2 @ w2.T, ref_hidden @ ref_weight.T
    (naive_logp(z, tokens) if use == "logp" else naive_kl(z, zr)).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_fused_leading_dims_and_entropy_detached():
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(n=24, dtype=torch.float32)
    h = hidden.view(4, 6, -1).requires_grad_()
    logp, kl, ent = fused_logprob_kl(
        h, weight, ref_hidden.view(4, 6, -1), ref_weight, tokens.view(4, 6), chunk_size=5, return_entropy=True
    )
    assert logp.shape == kl.shape == ent.shape == (4, 6)
    assert logp.requires_grad and kl.requires_grad and not ent.requires_grad
    flat = fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens, chunk_size=5)
    torch.testing.assert_close(kl.reshape(-1), flat[1])


def test_fused_shape_errors():
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(n=8)
    with pytest.raises(ValueError, match="leading shapes"):
        fused_logprob_kl(hidden, weight, ref_hidden[:4], ref_weight, tokens)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_logprob_kl(hidden, weight, ref_hidden, ref_weight[:5], tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_hidden(dtype):
    hidden, weight, _, _, tokens = make_inputs(n=30, dtype=dtype)
    lp = logprobs_from_hidden(hidden.view(5, 6, -1), weight, tokens.view(5, 6), chunk_size=7, temperature=0.9)
    assert lp.shape == (5, 6) and lp.dtype == torch.float32
    z = hidden.double() @ weight.double().T / 0.9
    torch.testing.assert_close(lp.reshape(-1).double(), naive_logp(z, tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sampled estimators


def test_sampled_kl_hand_worked():
    # p = 0.5, q = 0.25 at the sampled token; pi_old = 0.25 (ratio 2).
    logp, ref, old = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert sampled_kl(logp, ref, "k1").item() == pytest.approx(ln2)  # 0.6931
    assert sampled_kl(logp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)  # 0.2402
    assert sampled_kl(logp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1)  # q/p - log(q/p) - 1 = 0.1931
    assert sampled_kl(logp, ref, "k3_is", old_logp=old).item() == pytest.approx(2 * (0.5 + ln2 - 1))
    assert sampled_kl(logp, logp, "k3").item() == 0.0


def test_estimators_expectations_by_enumeration():
    """E_{x~p}[k1] = E_{x~p}[k3] = KL(p||q); E_{x~old}[k3_is] = KL(p||q), by exact enumeration."""
    torch.manual_seed(3)
    z, zr, zo = torch.randn(3, 10, dtype=F64), torch.randn(3, 10, dtype=F64), torch.randn(3, 10, dtype=F64)
    logp, logq, logo = (torch.log_softmax(t, -1) for t in (z, zr, zo))
    true = naive_kl(z, zr)
    for name in ("k1", "k3"):
        torch.testing.assert_close((logp.exp() * sampled_kl(logp, logq, name)).sum(-1), true)
    torch.testing.assert_close((logo.exp() * sampled_kl(logp, logq, "k3_is", old_logp=logo)).sum(-1), true)


def test_sampled_kl_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="old_logp"):
        sampled_kl(x, x, "k3_is")
    with pytest.raises(ValueError, match=r"'k4'.*k1.*k2.*k3.*k3_is"):
        sampled_kl(x, x, "k4")


# ------------------------------------------------------------------ registry


def test_registry_modes():
    assert set(KL_MODES) == {"full", "full_seq", "k1", "k2", "k3", "k3_is", "reward"}
    assert get_kl_mode("full").estimator is None and get_kl_mode("full").in_loss
    assert get_kl_mode("full_seq").sequence and get_kl_mode("full_seq").estimator is None
    assert not any(m.sequence for name, m in KL_MODES.items() if name != "full_seq")
    assert not get_kl_mode("reward").in_loss
    for name, mode in KL_MODES.items():
        assert mode.name == name
        assert mode.estimator is None or mode.estimator in ESTIMATORS
    with pytest.raises(ValueError, match=r"'nope'.*full.*k3_is.*reward"):
        get_kl_mode("nope")


def test_loss_kl_dispatch():
    torch.manual_seed(4)
    logp, ref, old, full = (torch.randn(2, 5) for _ in range(4))
    assert loss_kl("reward", logp=logp, ref_logp=ref) is None
    assert loss_kl("full", logp=logp, full_kl=full) is full
    assert loss_kl("full_seq", logp=logp, full_kl=full) is full  # the learner adds seq_kl_term
    for name in ("k1", "k2", "k3"):
        torch.testing.assert_close(loss_kl(name, logp=logp, ref_logp=ref), sampled_kl(logp, ref, name))
    torch.testing.assert_close(
        loss_kl("k3_is", logp=logp, ref_logp=ref, old_logp=old), sampled_kl(logp, ref, "k3_is", old_logp=old)
    )
    with pytest.raises(ValueError, match="full_kl"):
        loss_kl("full", logp=logp)
    with pytest.raises(ValueError, match="ref_logp"):
        loss_kl("k3", logp=logp)


def test_kl_in_reward_hand_worked():
    adv = torch.tensor([1.0, -1.0])
    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # k1 = old - ref: row 0: [0.5, -1.0, (masked)]; row 1: [0, 0.5, 0]. Return from t on (t' >= t):
    # row 0: [-0.5, -1.0, 0]; row 1: [0.5, 0.5, 0]
    out, metrics = kl_in_reward(adv, (old - ref) * mask, mask, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[1.05, 1.1, 0.0], [-1.05, -1.05, -1.0]]))
    assert metrics["reward_kl"].item() == pytest.approx(0.0)  # sequence sums -0.5 and 0.5
    assert metrics["reward_kl_penalty"].item() == pytest.approx(0.0)


@pytest.mark.parametrize("task_rewards", [[0.0] * 4, [1.0, 0.0, 0.0, 1.0]], ids=["all-equal", "mixed"])
def test_kl_in_reward_coefficient_controls_the_penalty(task_rewards):
    """The penalty is kl_coef times the KL return, whatever the group's task rewards: with all-equal
    rewards, standardising r - kl_coef * KL by the group std would give the standardised -KL for
    every kl_coef (about [0.34, 0.80, 0.57, -1.71] here)."""
    from system.algo.advantages import group_advantages

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    k1 = torch.rand(4, 4, generator=g, dtype=F64) * mask  # [B, T]
    task, _ = group_advantages(torch.tensor(task_rewards, dtype=F64), group_size=4)
    # from the formula: A[b, t] = A_task[b] - beta * sum_{t' >= t} k1[b, t']
    to_go = torch.stack([k1[:, t:].sum(-1) for t in range(4)], dim=-1)
    penalties = {}
    for beta in (0.1, 0.01, 0.0001):
        adv, _ = kl_in_reward(task, k1, mask, beta)
        torch.testing.assert_close(adv, (task[:, None] - beta * to_go) * mask, rtol=0, atol=1e-15)
        penalties[beta] = adv - task[:, None] * mask
    torch.testing.assert_close(penalties[0.01], penalties[0.1] / 10, rtol=1e-9, atol=0)
    torch.testing.assert_close(penalties[0.0001], penalties[0.1] / 1000, rtol=1e-9, atol=0)
    assert penalties[0.1].abs().max() > 0.05


def test_fused_precision_with_large_logit_offset():
    """A constant logit offset (common in real heads) must not cost precision: KL within fp32 noise."""
    hidden, weight, ref_hidden, ref_weight, tokens = make_inputs(n=32, v=2000, tied=True)
    ones = torch.ones(32, 1)
    h, rh = torch.cat([hidden, ones], 1), torch.cat([ref_hidden, ones], 1)
    w, rw = torch.cat([weight, torch.full((2000, 1), 100.0)], 1), torch.cat([ref_weight, torch.full((2000, 1), 101.0)], 1)
    logp, kl = fused_logprob_kl(h, w, rh, rw, tokens, chunk_size=10)
    z, zr = h.double() @ w.double().T, rh.double() @ rw.double().T
    torch.testing.assert_close(kl.double(), naive_kl(z, zr), rtol=0, atol=5e-6)
    torch.testing.assert_close(logp.double(), naive_logp(z, tokens), rtol=0, atol=2e-5)


def test_fused_with_reference_logits_given_equals_reference_head():
    """The `logits` transport (ref_weight=None, reference logits given) matches the `hidden` one."""
    torch.manual_seed(3)
    n, h_dim, vocab = 13, 6, 17
    hidden = torch.randn(n, h_dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, h_dim, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(n, 5, dtype=torch.float64), torch.randn(vocab, 5, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (n,))
    a_logp, a_kl = fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens, chunk_size=4)
    ga = torch.autograd.grad((a_logp * 0.3 + a_kl).sum(), (hidden, weight))
    b_logp, b_kl = fused_logprob_kl(hidden, weight, ref_hidden @ ref_weight.T, None, tokens, chunk_size=4)
    gb = torch.autograd.grad((b_logp * 0.3 + b_kl).sum(), (hidden, weight))
    torch.testing.assert_close(a_logp, b_logp)
    torch.testing.assert_close(a_kl, b_kl)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_logprob_kl(hidden, weight, torch.randn(n, vocab + 1), None, tokens)
