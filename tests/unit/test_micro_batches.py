"""Token-budget micro-batches (system/data/micro_batches.py) and what the learner and the reference
worker do with them: the plans keep to the budget and cover every row once, ranks are balanced by
tokens and run as many micro-batches, a row longer than the budget is a one-line error; and the
update is the same whatever the cut. In float64 on a tiny Qwen2 model, one optimizer step of the
learner's own code (LearnerWorker._optimizer_step, gradients accumulated over micro-batches) gives
the same gradient (rtol 1e-10) and the same logged metrics (rtol 1e-6: the loss module keeps its
statistics in float32) for today's layout (one rank, one padded forward) and for token-budget
micro-batches padded and packed, on one and two ranks, with a stand-in micro-batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from system.data.batch import build_batch, split_for_learners, split_packed
from system.data.micro_batches import (balance_ranks, equal_counts, in_row_order, micro_batch_cost,
                                       packed_inputs, packed_positions, plan_micro_batches)
from tests.learner_stub import stub_learner

F64 = torch.float64


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(16, min(1024, int(rng.lognormvariate(5.0, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("packed", [False, True])
def test_plans_keep_to_the_budget_and_cover_every_row_once(packed):
    lengths = lognormal_lengths(300)
    plans = plan_micro_batches(lengths, 4096, packed)
    assert sorted(i for mb in plans for i in mb) == list(range(300))
    assert all(micro_batch_cost([lengths[i] for i in mb], packed) <= 4096 for mb in plans)
    # longest first: each micro-batch's rows are no longer than the previous one's
    firsts = [lengths[mb[0]] for mb in plans]
    assert firsts == sorted(firsts, reverse=True)
    padded_cost = sum(micro_batch_cost([lengths[i] for i in mb], False) for mb in plans)
    assert padded_cost < 300 * max(lengths)  # far less than padding every row to the longest


def test_a_row_longer_than_the_budget_is_an_error_naming_both_numbers():
    with pytest.raises(ValueError) as err:
        plan_micro_batches([10, 700, 30], 512, False, "learner.max_tokens_per_micro_batch")
    assert str(err.value).startswith("learner.max_tokens_per_micro_batch: a row of 700 tokens")
    assert "learner.max_tokens_per_micro_batch=512" in str(err.value)


def test_ranks_are_balanced_by_tokens():
    lengths = lognormal_lengths(64, seed=1)
    ranks = balance_ranks(lengths, 4)
    assert sorted(i for r in ranks for i in r) == list(range(64))
    tokens = [sum(lengths[i] for i in r) for r in ranks]
    assert max(tokens) - min(tokens) <= max(lengths)
    assert all(ranks)
    # by count, the same rows would be far less even
    by_count = [sum(lengths[16 * r:16 * r + 16]) for r in range(4)]
    assert max(tokens) - min(tokens) < max(by_count) - min(by_count)


def test_every_rank_gets_as_many_micro_batches():
    plans = equal_counts([[[0, 1, 2, 3], [4]], [[5]], [[6], [7], [8]]])
    assert [len(p) for p in plans] == [3, 3, 3]
    assert sorted(i for mb in plans[0] for i in mb) == [0, 1, 2, 3, 4]  # split, not dropped
    assert plans[1] == [[5], [], []]  # one row: empty micro-batches (the learner runs a stand-in)


def test_packed_positions_pick_the_padded_rows_positions():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7]
    ids = torch.randint(1, 50, (3, 7), generator=g)
    attn = torch.zeros(3, 7, dtype=torch.long)
    loss_mask = torch.zeros(3, 6)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        loss_mask[i, 1:n - 1] = 1
    packed, positions = packed_inputs(ids, attn)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 6]]
    where = packed_positions(attn, loss_mask)
    # the token each position predicts is the same in both layouts
    assert packed[0, where + 1].tolist() == ids[:, 1:][loss_mask.bool()].tolist()
    values = torch.arange(int(loss_mask.sum()))
    counts = loss_mask.sum(-1).long().tolist()
    pieces = [([2, 0], torch.cat([values[counts[0] + counts[1]:], values[:counts[0]]])),
              ([1], values[counts[0]:counts[0] + counts[1]])]
    assert in_row_order(pieces, counts).tolist() == values.tolist()


def test_split_for_learners_covers_each_minibatch_and_plans_each_rank():
    batch = random_batch(16, seed=3)
    split = split_for_learners(batch, 2, 2, "token-mean", max_tokens=40, packed=False)
    for m in range(2):
        rows = sorted(int(split.rows[r][p]) for r in range(2) for mb in split.plans[r][m] for p in mb)
        assert rows == list(range(8 * m, 8 * m + 8))
        assert len(split.plans[0][m]) == len(split.plans[1][m])
    assert split.normalizers == [float(batch.loss_mask[:8].sum()), float(batch.loss_mask[8:].sum())]


# ---------------------------------------------------------------- the update, whatever the cut

def random_batch(n: int, seed: int, vocab: int = 61):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 4))] for _ in range(n)]
    responses = [[rng.randrange(vocab) for _ in range(rng.choice([1, 2, 3, 5, 9, 14]))] for _ in range(n)]
    return build_batch(prompts, responses, pad_id=0)


def one_step(policy, ref, batch, layout, aggregation: str, kl_mode: str, monkeypatch):
    """One optimizer step of the batch as one minibatch, cut as `layout` = (ranks, max_tokens,
    packed, stand_in) says: (summed gradient over ranks, metrics as the driver logs them)."""
    pytest.importorskip("deepspeed")
    import workers.learner as learner_mod
    from system.metrics import reduce_learner_steps
    from tests.unit.test_learner import drift
    from workers.policy import PolicyWithHead

    monkeypatch.setattr(learner_mod, "_all_ranks", lambda ok, device: bool(ok))
    ranks, max_tokens, packed, stand_in = layout
    split = split_for_learners(batch, ranks, 1, aggregation, max_tokens, packed)
    with torch.no_grad():
        out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        ref_rows = out.hidden_states[-1][:, :-1][batch.loss_mask.bool()]
    adv = torch.randn(batch.size, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref_head = ref.get_output_embeddings().weight.detach().clone()
    per_rank, grads = [], None
    for r in range(ranks):
        idx, plan = split.rows[r], split.plans[r]
        if stand_in and r == 0:
            plan = [plan[0] + [[]]]
        w = stub_learner(PolicyWithHead(policy, ref_head, temperature=0.7, packed=packed), kl_mode,
                         kl_coef=0.3, aggregation=aggregation, max_len=16)
        # no sampler log-probs: the learner computes pi_old, micro-batch by micro-batch
        w.prepare(batch.rows(idx), split_packed(ref_rows, batch.loss_mask, idx), plan)
        start = copy.deepcopy(policy.state_dict())
        drift(policy, 0.05, seed=3)  # pi_theta != pi_old
        micro = w._micro_batches(dict(w.shard, advantages=adv[idx]))[0]
        assert any(mb["stand_in"] for mb in micro) == (stand_in and r == 0)
        policy.zero_grad(set_to_none=True)
        stats, applied = w._optimizer_step(micro, split.normalizers[0], first=True)
        assert applied
        stats.pop("grad_norm")  # after the ranks' reduction in DeepSpeed; not one rank's
        g = [p.grad.clone() for p in policy.parameters()]
        policy.load_state_dict(start)
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        per_rank.append([stats])
    return grads, reduce_learner_steps(per_rank)


LAYOUTS = {  # (ranks, max_tokens, packed, a stand-in micro-batch on rank 0)
    "2 ranks, token budget, padded": (2, 40, False, False),
    "1 rank, token budget, padded": (1, 40, False, False),
    "1 rank, token budget, packed": (1, 40, True, False),
    "2 ranks, token budget, packed, stand-in": (2, 40, True, True),
    "2 ranks, one micro-batch each, padded": (2, None, False, False),
}


@pytest.mark.parametrize("aggregation,kl_mode", [("token-mean", "full"), ("seq-mean-token-mean", "full"),
                                                  ("seq-mean-token-sum-norm", "k3")])
def test_gradient_and_metrics_are_the_same_whatever_the_micro_batching_float64(aggregation, kl_mode,
                                                                                monkeypatch):
    from tests.unit.test_learner import drift, tiny_qwen2

    ref = tiny_qwen2(False)
    policy = copy.deepcopy(ref)
    drift(policy, 0.05, seed=2)
    batch = random_batch(8, seed=5)
    assert len(plan_micro_batches(batch.attention_mask.sum(-1).tolist(), 40, False)) > 2
    want_grads, want = one_step(policy, ref, batch, (1, None, False, False), aggregation, kl_mode, monkeypatch)
    assert abs(want["ratio_max"] - 1) > 1e-3  # pi_theta != pi_old: the clipping matters
    for name, layout in LAYOUTS.items():
        grads, got = one_step(policy, ref, batch, layout, aggregation, kl_mode, monkeypatch)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13, msg=name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, key)


@pytest.mark.parametrize("transport", ["hidden", "logits"])
def test_reference_rows_are_the_same_whatever_the_micro_batching(transport):
    from tests.unit.test_learner import tiny_qwen2
    from workers.reference import ReferenceWorker

    model = tiny_qwen2(True)
    batch = random_batch(8, seed=6)
    inputs = batch.reference_inputs(slice(None))
    outs = []
    for max_tokens, packed in ((10**6, False), (40, False), (40, True)):
        w = ReferenceWorker.__new__(ReferenceWorker)
        w.model, w.transport, w.device, w.max_tokens, w.packed = model, transport, torch.device("cpu"), max_tokens, packed
        outs.append(w.forward(**inputs)["rows"])
    for got in outs[1:]:
        torch.testing.assert_close(got, outs[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reference.max_tokens_per_micro_batch: a row of"):
        w.max_tokens = 4
        w.forward(**inputs)


def test_a_non_finite_loss_after_the_first_micro_batch_skips_the_step(monkeypatch):
    """Micro-batch 2 of 3 has a NaN loss: the gradients already accumulated are poisoned (NaN, at
    the accumulation boundary) so that the step's own check discards them; no optimizer step."""
    pytest.importorskip("deepspeed")
    import types

    import workers.learner as learner_mod
    from tests.unit.test_learner import tiny_qwen2
    from workers.policy import PolicyWithHead

    monkeypatch.setattr(learner_mod, "_all_ranks", lambda ok, device: bool(ok))
    policy = tiny_qwen2(False)
    batch = random_batch(8, seed=5)
    split = split_for_learners(batch, 1, 1, "token-mean", 40, False)
    assert len(split.plans[0][0]) >= 3
    w = stub_learner(PolicyWithHead(policy, policy.lm_head.weight.detach().clone(), 0.7), "full",
                     kl_coef=0.3, aggregation="token-mean", max_len=16)
    w.engine.optimizer = types.SimpleNamespace(zero_grad=lambda set_to_none: policy.zero_grad(set_to_none))
    stepped = []
    w.engine.step = lambda: stepped.append(1)
    with torch.no_grad():
        out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    w.prepare(batch.rows(split.rows[0]), out.hidden_states[-1][:, :-1][batch.loss_mask.bool()],
              split.plans[0])
    calls = []

    def nan_second(loss, logp_p):
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss
    w._inject_nonfinite = nan_second
    micro = w._micro_batches(dict(w.shard, advantages=torch.ones(batch.size, dtype=F64)))[0]
    stats, applied = w._optimizer_step(micro, split.normalizers[0], first=True)
    assert not applied and not stepped and len(calls) == 2  # stopped at the NaN micro-batch
    assert all(p.grad is None for p in policy.parameters())  # discarded


def test_config_resolves_packing_at_load_and_names_the_budget_keys():
    from system.config import ConfigError, load_config

    cfg = load_config("configs/qwen2.5-0.5b-gsm8k.yaml")
    assert (cfg.learner.packing, cfg.reference.packing) == ("off", "off")  # sdpa: padded per micro-batch
    cfg = load_config("configs/qwen2.5-0.5b-gsm8k.yaml", ["model.attn_implementation=flash_attention_2"])
    assert (cfg.learner.packing, cfg.reference.packing) == ("on", "on")
    cfg = load_config("configs/debug.yaml", ["learner.packing=on", "reference.packing=off"])  # YAML booleans
    assert (cfg.learner.packing, cfg.reference.packing) == ("on", "off")
    with pytest.raises(ConfigError, match="^reference.micro_batch: replaced by reference.max_tokens_per_micro_batch"):
        load_config("configs/debug.yaml", ["reference.micro_batch=32"])
    with pytest.raises(ConfigError, match="^learner.max_tokens_per_micro_batch: 1000 is less than the longest row"):
        load_config("configs/qwen2.5-0.5b-gsm8k.yaml", ["learner.max_tokens_per_micro_batch=1000"])
    with pytest.raises(ConfigError, match="^model.attn_implementation: flash_attention_2 runs on GPU only"):
        load_config("configs/debug.yaml", ["model.attn_implementation=flash_attention_2"])
