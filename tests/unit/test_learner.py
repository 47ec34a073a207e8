"""The learner's per-token math on a tiny Qwen2 model in float64, against a naive implementation
written from the formulas (Hugging Face logits divided by T, softmax, the clipped surrogate):
pi_theta, pi_old, pi_ref and the KL at a sampling temperature T != 1, both reference transports,
tied and untied heads, and the dtype kept throughout."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("deepspeed")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from system.algo.off_policy import CorrectionSettings  # noqa: E402
from tests.learner_stub import stub_learner  # noqa: E402
from workers.learner import LearnerWorker  # noqa: E402
from workers.policy import PolicyWithHead  # noqa: E402

F64 = torch.float64
T = 0.7
V = 61


def tiny_qwen2(tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).to(F64).eval()


def drift(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every parameter a little, as optimizer steps would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def shard() -> dict:
    """Three right-padded rows: prompt + response; loss_mask marks positions predicting a response token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (4, 9), generator=g)
    attn = torch.ones(4, 9, dtype=torch.long)
    loss_mask = torch.zeros(4, 8)
    for row, (prompt, response) in enumerate([(3, 6), (2, 4), (4, 5), (3, 1)]):
        attn[row, prompt + response:] = 0
        loss_mask[row, prompt - 1:prompt + response - 1] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def naive_logprobs(model, s: dict) -> torch.Tensor:
    """log softmax(logits / T) of every vocabulary entry at the masked positions: [M, V]."""
    logits = model(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).logits
    return torch.log_softmax(logits[:, :-1][s["loss_mask"].bool()] / T, dim=-1)


def learner(policy, ref, transport: str, kl_mode: str) -> tuple[LearnerWorker, torch.Tensor]:
    """A LearnerWorker around `policy` (no process group, no DeepSpeed), and the reference rows the
    reference worker would send for shard()."""
    s = shard()
    ref_head = ref.get_output_embeddings().weight.detach().clone() if transport == "hidden" else None
    worker = stub_learner(PolicyWithHead(policy, ref_head, temperature=T), kl_mode, kl_coef=0.3,
                          aggregation="token-mean", max_len=8)
    with torch.no_grad():
        out = ref(input_ids=s["input_ids"], attention_mask=s["attention_mask"], output_hidden_states=True)
        rows = out.hidden_states[-1] if transport == "hidden" else out.logits
    return worker, rows[:, :-1][s["loss_mask"].bool()]


@pytest.mark.parametrize("kl_mode", ["full", "k3"])
@pytest.mark.parametrize("transport", ["hidden", "logits"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_learner_loss_at_temperature_matches_naive_float64(tied, transport, kl_mode):
    ref = tiny_qwen2(tied)
    policy = copy.deepcopy(ref)
    drift(policy, 0.05, seed=2)  # pi_old != pi_ref
    worker, ref_rows = learner(policy, ref, transport, kl_mode)
    s = shard()
    mask = s["loss_mask"].bool()
    tokens = s["input_ids"][:, 1:][mask]  # [M]
    with torch.no_grad():
        old_all, ref_all = naive_logprobs(policy, s), naive_logprobs(ref, s)  # [M, V]
    prep = worker.prepare(s, ref_rows)
    # pi_old and pi_ref of the sampled tokens, tempered, in the model's dtype
    for got, want in ((worker.shard["old_logp"], old_all), (worker.shard["ref_logp"], ref_all)):
        assert got.dtype == F64
        torch.testing.assert_close(got[mask], want.gather(1, tokens[:, None]).squeeze(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(prep["k1"], worker.shard["old_logp"] - worker.shard["ref_logp"])

    drift(policy, 0.05, seed=3)  # pi_theta != pi_old: ratios away from 1
    stats = check_update_against_naive(worker, policy, old_all.gather(1, tokens[:, None]).squeeze(1),
                                       ref_all, kl_mode)
    assert abs(stats["ratio_max"] - 1) > 1e-3


def check_update_against_naive(worker, policy, old: torch.Tensor, ref_all: torch.Tensor, kl_mode: str,
                               pg_weight: torch.Tensor | None = None) -> dict:
    """The learner's minibatch loss and its gradients equal the loss from the formulas, on the
    model's own logits divided by T: mean of w * clipped surrogate (ratio pi_theta / old) + 0.3 * KL.
    old: [M] log pi_old of the sampled tokens; ref_all: [M, V]; pg_weight: [M] or None (w = 1)."""
    s = shard()
    mask = s["loss_mask"].bool()
    tokens = s["input_ids"][:, 1:][mask]  # [M]
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0], dtype=F64)
    mb = worker._micro_batches(dict(worker.shard, advantages=adv))[0][0]
    loss, _, stats = worker._minibatch_loss(mb, normalizer=float(mask.sum()), first=True)
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    logp_all = naive_logprobs(policy, s)  # [M, V], with grad
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    ref_logp = ref_all.gather(1, tokens[:, None]).squeeze(1)
    if kl_mode == "full":  # KL(pi_theta^T || pi_ref^T) over the vocabulary
        kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1)
    else:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    a = adv[:, None].expand(mask.shape)[mask]
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    want = ((pg if pg_weight is None else pg_weight * pg) + 0.3 * kl).mean()
    want_grads = torch.autograd.grad(want, list(policy.parameters()))

    assert loss.dtype == F64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    return stats


def proximal_learner(kl_mode: str, **cfg):
    """A learner on a sample drawn by an older policy (the sampler), prepared with
    algo.pi_old=proximal and `cfg`: (worker, policy, mask, sampler_lp, prox_lp, ref_all, prepare's
    output); the log-probs [M] (ref_all [M, V]) from the naive formulas."""
    ref = tiny_qwen2(False)
    sampler = copy.deepcopy(ref)
    drift(sampler, 0.05, seed=2)
    policy = copy.deepcopy(sampler)
    drift(policy, 0.3, seed=4)  # k updates later: far enough that some weights are corrected
    worker, ref_rows = learner(policy, ref, "hidden", kl_mode)
    worker.settings = dataclasses.replace(worker.settings, pi_old="proximal",
                                          correction=CorrectionSettings(1.5, (0.6, 1.5), "token"), **cfg)
    s = shard()
    mask = s["loss_mask"].bool()
    tokens = s["input_ids"][:, 1:][mask]  # [M]
    with torch.no_grad():
        sampler_lp, prox_lp = (naive_logprobs(m, s).gather(1, tokens[:, None]).squeeze(1)
                               for m in (sampler, policy))
        ref_all = naive_logprobs(ref, s)  # [M, V]
    behavior = torch.zeros(mask.shape, dtype=F64).masked_scatter(mask, sampler_lp)
    prep = worker.prepare(dict(s, behavior_logp=behavior), ref_rows)
    return worker, policy, mask, sampler_lp, prox_lp, ref_all, prep


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_decoupled_objective_matches_naive_float64(correction):
    """algo.pi_old=proximal: the ratio divides by the learner's own log-probs at the start of the
    update, and the policy-gradient term is weighted by the corrected pi_prox / pi_sampler, where
    pi_sampler is an older policy (a sample drawn k versions ago)."""
    worker, policy, mask, sampler_lp, prox_lp, ref_all, prep = proximal_learner(
        "full", rollout_correction=correction)
    torch.testing.assert_close(worker.shard["old_logp"][mask], prox_lp, rtol=0, atol=1e-12)
    rho = torch.exp(prox_lp - sampler_lp)
    w = rho.clamp(max=1.5) if correction == "tis" else ((rho >= 0.6) & (rho <= 1.5)).to(F64)
    torch.testing.assert_close(worker.shard["pg_weight"][mask], w, rtol=0, atol=1e-12)
    assert 0 < prep["mismatch"]["corrected_frac"] < 1

    drift(policy, 0.05, seed=3)  # pi_theta != pi_prox within the update
    check_update_against_naive(worker, policy, prox_lp, ref_all, "full", pg_weight=w)


# ------------------------------------------------------------------ full_seq: the sequence KL

def naive_full_seq(logp, old, kl, mask, b, weighting: str, cap: float, weight=None, behaviour=None):
    """Per-token (value, gradient surrogate) of full_seq, row by row from the formulas of
    system/algo/kl_seq.py: G_t = sum_{t'>t} KL_t'; token: KL_t + w_t r_t sg(G_t - b_t) (value KL_t,
    r = pi_theta / pi_old, w = the pg term's correction weight, 1 by default); prefix:
    rho_<t KL_t + log pi_t sg(sum_{t'>t} rho_<t' KL_t' - rho_<=t b_t) (value rho_<t KL_t), every
    rho = prod pi_theta / pi_b over the positions before (up to) t, capped, pi_b = behaviour
    (default pi_old). logp, kl: [M] with grad, old, weight, behaviour [M], b [B, T]; mask [B, T]
    bool. Returns two [M] tensors, packed like logp."""
    weight = torch.ones_like(old) if weight is None else weight
    behaviour = old if behaviour is None else behaviour
    values, surrogates, i = [], [], 0
    for row in range(mask.shape[0]):
        pos = mask[row].nonzero().flatten().tolist()
        n = len(pos)
        lp, lo, k, w = logp[i:i + n], old[i:i + n], kl[i:i + n], weight[i:i + n]
        d = (lp - behaviour[i:i + n]).detach()
        i += n
        for j, t in enumerate(pos):
            if weighting == "token":
                to_go = sum((k[u].detach() for u in range(j + 1, n)), torch.zeros((), dtype=F64))
                values.append(k[j])
                surrogates.append(k[j] + w[j] * torch.exp(lp[j] - lo[j]) * (to_go - b[row, t]))
            else:
                rho = lambda upto: min(float(torch.exp(d[:upto].sum())), cap or float("inf"))  # noqa: E731
                r_to_go = sum(rho(u) * float(k[u].detach()) for u in range(j + 1, n))
                values.append(rho(j) * k[j])
                surrogates.append(rho(j) * k[j] + lp[j] * (r_to_go - rho(j + 1) * float(b[row, t])))
    return torch.stack(values), torch.stack(surrogates)


def full_seq_setup(weighting: str, cap: float = 0.0):
    ref = tiny_qwen2(False)
    policy = copy.deepcopy(ref)
    drift(policy, 0.05, seed=2)  # pi_old != pi_ref
    worker, ref_rows = learner(policy, ref, "hidden", "full_seq")
    worker.settings = dataclasses.replace(worker.settings, kl_seq_weight=weighting, kl_prefix_cap=cap)
    return ref, policy, worker, ref_rows


ADV = torch.tensor([1.0, -0.5, 0.25, -2.0], dtype=F64)


def seq_baseline() -> torch.Tensor:
    return torch.rand(4, 8, generator=torch.Generator().manual_seed(9), dtype=F64)  # [B, T]


@pytest.mark.parametrize("weighting,cap", [("token", 0.0), ("prefix", 0.0), ("prefix", 1.02)])
def test_full_seq_learner_loss_and_grads_match_formula_float64(weighting, cap):
    """The learner's full_seq minibatch loss: mean of clipped surrogate + 0.3 * KL term, with the
    KL-to-go score term's gradient, equals the formula on the model's own logits / T."""
    ref, policy, worker, ref_rows = full_seq_setup(weighting, cap)
    s = shard()
    mask = s["loss_mask"].bool()
    tokens = s["input_ids"][:, 1:][mask]  # [M]
    with torch.no_grad():
        old = naive_logprobs(policy, s).gather(1, tokens[:, None]).squeeze(1)
        ref_all = naive_logprobs(ref, s)
    worker.prepare(s, ref_rows)
    drift(policy, 0.05, seed=3)  # pi_theta != pi_old
    b = seq_baseline()
    mb = worker._micro_batches(dict(worker.shard, advantages=ADV, kl_baseline=b))[0][0]
    loss, _, stats = worker._minibatch_loss(mb, normalizer=float(mask.sum()), first=True)
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    logp_all = naive_logprobs(policy, s)  # [M, V], with grad
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1)  # [M]
    value, surrogate = naive_full_seq(logp, old, kl, mask, b, weighting, cap)
    a = ADV[:, None].expand(mask.shape)[mask]
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    want = (pg + 0.3 * value).mean()
    want_grads = torch.autograd.grad((pg + 0.3 * surrogate).mean(), list(policy.parameters()),
                                     retain_graph=True)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    seq_sums = [float(kl.detach()[mask[:r].sum():mask[:r + 1].sum()].sum()) for r in range(4)]
    assert stats["kl_seq"] == pytest.approx(sum(seq_sums) / 4, rel=1e-12)
    assert (weighting == "prefix") == ("prefix_ratio_max" in stats)
    # the score term matters here: without it the gradient is `full`'s
    full_grads = torch.autograd.grad((pg + 0.3 * value).mean(), list(policy.parameters()))
    assert max(float((g - f).abs().max()) for g, f in zip(grads, full_grads)) > 1e-6


@pytest.mark.parametrize("weighting", ["token", "prefix"])
def test_full_seq_one_rank_equals_two_ranks(weighting):
    """Rows 0-1 on one worker and rows 2-3 on another, each with the whole minibatch's normalizer:
    the shard losses and gradients add up to one rank's, and the combined statistics
    (system.metrics.reduce_learner_steps) equal one rank's."""
    from system.data.batch import split_packed
    from system.metrics import reduce_learner_steps

    ref, policy, worker, ref_rows = full_seq_setup(weighting)
    s, b = shard(), seq_baseline()
    n_tok = float(s["loss_mask"].sum())
    ranks = [(worker, s, ref_rows, b)]
    for rows in ([0, 1], [2, 3]):
        w, _ = full_seq_setup(weighting)[2:]
        w.engine = worker.engine  # the same policy
        idx = torch.tensor(rows)
        sub = {k: v[idx] for k, v in s.items()}
        ranks.append((w, sub, split_packed(ref_rows, s["loss_mask"], idx), b[idx]))
    for w, sub, rows_, _ in ranks:
        w.prepare(sub, rows_)
    drift(policy, 0.05, seed=3)
    results = []
    for w, sub, _, base in ranks:
        adv = ADV if sub is s else ADV[[0, 1]] if w is ranks[1][0] else ADV[[2, 3]]
        mb = w._micro_batches(dict(w.shard, advantages=adv, kl_baseline=base))[0][0]
        loss, _, stats = w._minibatch_loss(mb, normalizer=n_tok, first=True)
        results.append((loss, torch.autograd.grad(loss, list(policy.parameters())), stats))
    (one_loss, one_grads, one_stats), two = results[0], results[1:]
    torch.testing.assert_close(two[0][0] + two[1][0], one_loss, rtol=1e-12, atol=1e-15)
    for g1, g2a, g2b in zip(one_grads, two[0][1], two[1][1]):
        torch.testing.assert_close(g2a + g2b, g1, rtol=1e-10, atol=1e-13)
    for st in (one_stats, *(r[2] for r in two)):
        st["loss"] = 0.0  # the update adds it; not part of this check
    one, combined = reduce_learner_steps([[one_stats]]), reduce_learner_steps([[r[2]] for r in two])
    for key in ("kl_seq", "kl_full", "kl_to_go", "pg_loss", "ratio_max"):
        assert combined[key] == pytest.approx(one[key], rel=1e-6), key  # float32 statistics


@pytest.mark.parametrize("weighting", ["token", "prefix"])
def test_full_seq_with_the_decoupled_objective_matches_formula_float64(weighting):
    """algo.pi_old=proximal with tis on a sample drawn by an older policy: `token` takes the ratio
    over pi_prox times the pg term's corrected weight; `prefix` takes its ratios over the sampler."""
    worker, policy, mask, sampler_lp, prox_lp, ref_all, _ = proximal_learner(
        "full_seq", rollout_correction="tis", kl_seq_weight=weighting)
    s = shard()
    tokens = s["input_ids"][:, 1:][mask]  # [M]
    pick = lambda all_: all_.gather(1, tokens[:, None]).squeeze(1)  # noqa: E731
    w = torch.exp(prox_lp - sampler_lp).clamp(max=1.5)
    drift(policy, 0.05, seed=3)  # pi_theta != pi_prox within the update
    b = seq_baseline()
    mb = worker._micro_batches(dict(worker.shard, advantages=ADV, kl_baseline=b))[0][0]
    loss, _, _ = worker._minibatch_loss(mb, normalizer=float(mask.sum()), first=True)
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    logp_all = naive_logprobs(policy, s)
    logp = pick(logp_all)
    kl = (logp_all.exp() * (logp_all - ref_all)).sum(-1)
    value, surrogate = naive_full_seq(logp, prox_lp, kl, mask, b, weighting, 0.0, weight=w,
                                      behaviour=sampler_lp)
    a = ADV[:, None].expand(mask.shape)[mask]
    ratio = torch.exp(logp - prox_lp)
    pg = -w * torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    torch.testing.assert_close(loss, (pg + 0.3 * value).mean(), rtol=1e-12, atol=1e-15)
    want_grads = torch.autograd.grad((pg + 0.3 * surrogate).mean(), list(policy.parameters()))
    for g, want in zip(grads, want_grads):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-13)
