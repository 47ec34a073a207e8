"""The distributed pipeline on CPU: Ray actors, DeepSpeed learner ranks over gloo, weight sync."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.conftest import TEST_OVERRIDES, build_trainer, stop_trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_step_run_end_to_end(actor_pool, tmp_path, zero_stage):
    """ZeRO-3 runs on the actors ZeRO-2 left: the learners rebuild their engines (ActorPool)."""
    from system.train import main

    rc = main(["--config", "configs/debug.yaml", *TEST_OVERRIDES, "trainer.steps=2",
               f"learner.zero_stage={zero_stage}", f"output_dir={tmp_path}", "run_name=e2e"],
              pool=actor_pool)
    assert rc == 0
    run = tmp_path / "e2e"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [x["step"] for x in train] == [1, 2]
    assert [x["step"] for x in evals] == [0, 2]
    for x in train:
        for key in ("time_generate", "time_reward", "time_reference", "time_learn", "time_sync",
                    "kl_full", "kl_k3", "kl_gap", "clip_frac", "entropy", "reward_mean",
                    "tokens_per_s", "ref_bytes"):
            assert key in x and x[key] == x[key], key  # present and not NaN
        assert x["kl_full"] >= 0
    assert x["policy_version"] == 2
    # rollout_ahead=1 (the default): step 1's sample was drawn by the policy the learners hold, so
    # the sampler's log-probs (pi_old of the ratio) equal theirs; step 2's was drawn during step
    # 1's update, by the policy before it
    gaps = [x["behavior_logp_gap"] for x in train]
    assert gaps[0] < 1e-4 and gaps[1] > 10 * max(gaps[0], 1e-7), gaps
    assert [x["staleness"] for x in train] == [0, 1]  # versions between drawing and learning
    assert "greedy_accuracy" in evals[-1]
    assert (run / "config.yaml").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def _one_batch(trainer, logprobs: bool = False):
    """A batch sampled by the trainer's rollout workers, with its rewards and reference rows (and
    the sampler's log-probs as pi_old, as rollout_ahead uses them, if `logprobs`)."""
    from system.data.batch import build_batch

    G = trainer.cfg.rollout.group_size
    rows = trainer.sampler.next(trainer.cfg.trainer.prompts_per_step)
    prompts = [r["prompt_ids"] for r in rows for _ in range(G)]
    responses, sampler_logp = trainer.collect(trainer.launch_generate(
        [r["prompt_ids"] for r in rows], G, seed=123, want_logprobs=logprobs))
    texts = trainer.tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores, _ = trainer.rewards.score(texts, [r["answer"] for r in rows for _ in range(G)])
    batch = build_batch(prompts, responses, trainer.pad_id, sampler_logp)
    # make sure the advantages are not all zero, whatever the policy sampled
    rewards = torch.tensor(scores) + torch.linspace(0, 1, batch.size)
    return batch, rewards


def _learner_weights(trainer) -> dict:
    import ray

    return ray.get(trainer.learners.actors[0].weights.remote())


def test_sync_makes_rollout_weights_equal_learner_bit_for_bit(actor_pool, tmp_path):
    trainer = build_trainer(tmp_path, pool=actor_pool)
    try:
        batch, rewards = _one_batch(trainer)
        before = _learner_weights(trainer)
        trainer.learn(batch, rewards, trainer.reference_rows(batch))
        trainer.version += 1
        trainer.actors.sync(trainer.version)
        learner = _learner_weights(trainer)
        assert any(not torch.equal(before[k], learner[k]) for k in learner), "update changed nothing"
        for worker in trainer.rollout.call("weights"):
            assert worker.keys() == learner.keys()
            for k in learner:
                assert torch.equal(worker[k], learner[k]), k
        assert trainer.rollout.call("get_version") == [1]
    finally:
        stop_trainer(trainer, actor_pool)


# The second epoch runs with pi_theta != pi_ref, so the KL and its gradient are not zero; two
# minibatches, so metrics are combined over steps as well as ranks; plain SGD without clipping, so
# the weights move by exactly -lr * gradient (AdamW and clipping would hide a wrong gradient scale);
# sampled at T = 0.7 with the sampler's log-probs as pi_old (as rollout_ahead=1 runs).
UPDATE = ["learner.epochs=2", "learner.minibatches=2", "learner.optimizer=sgd", "learner.grad_clip=0",
          "learner.lr=0.05", "learner.warmup_steps=0", "rollout.temperature=0.7"]


@pytest.fixture(scope="module")
def reference_update(actor_pool, tmp_path_factory):
    """Two learner ranks, hidden transport: one update on a fixed batch, each rank's share of a
    minibatch cut into micro-batches of at most 24 tokens (a debug row is ~10)."""
    trainer = build_trainer(tmp_path_factory.mktemp("ref"), [*UPDATE, "learner.max_tokens_per_micro_batch=24"],
                            actor_pool)
    try:
        batch, rewards = _one_batch(trainer, logprobs=True)
        start = _learner_weights(trainer)
        metrics = trainer.learn(batch, rewards, trainer.reference_rows(batch))
        weights = _learner_weights(trainer)
    finally:
        stop_trainer(trainer, actor_pool)
    yield batch, rewards, metrics, weights, start


def _update_with(tmp_path, overrides, batch, rewards, pool=None):
    trainer = build_trainer(tmp_path, [*UPDATE, *overrides], pool)
    try:
        rows = trainer.reference_rows(batch)  # [M, H] (hidden transport) or [M, V] (logits)
        return trainer.learn(batch, rewards, rows), _learner_weights(trainer), rows.shape[-1]
    finally:
        stop_trainer(trainer, pool)


def _assert_same_update(a: dict, b: dict, start: dict, rel: float) -> None:
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3, f"the update moved the weights by only {moved:.3g}"
    assert worst <= rel * moved, f"largest weight difference {worst:.3g} > {rel} x the update {moved:.3g}"


def test_learner_computes_the_sampling_temperatures_distribution(reference_update):
    """Before any step pi_theta = pi_old, so the sampler's log-probs at T = 0.7 must be the
    learner's (a learner at T = 1 is about 1 nat per token away)."""
    metrics = reference_update[2]
    assert metrics["behavior_logp_gap"] < 1e-4, metrics["behavior_logp_gap"]


def test_one_learner_rank_equals_two(reference_update, tmp_path):
    """Same weights (SGD: the same gradients) and every logged metric the same, on 1 or 2 ranks,
    and whatever the micro-batches: two ranks with token-budget micro-batches padded per
    micro-batch (DeepSpeed accumulating between boundaries), one rank with one packed row per
    minibatch."""
    batch, rewards, metrics2, weights2, start = reference_update
    metrics1, weights1, _ = _update_with(tmp_path, ["learner.num_ranks=1", "learner.packing=on"], batch, rewards)
    assert metrics1.keys() == metrics2.keys()
    for key in metrics1:
        assert metrics1[key] == pytest.approx(metrics2[key], rel=1e-4, abs=1e-6), key
    assert metrics2["kl_full"] > 1e-6 and metrics2["ratio_max"] > 1.01
    _assert_same_update(weights1, weights2, start, rel=1e-4)


def test_hidden_and_logits_transport_agree(reference_update, actor_pool, tmp_path):
    """The same update with the reference workers sending full logits instead of hidden states (on
    the same actors: a reused reference worker takes the new transport)."""
    batch, rewards, metrics_h, weights_h, start = reference_update
    metrics_l, weights_l, row_width = _update_with(tmp_path, ["reference.transport=logits"], batch, rewards, actor_pool)
    vocab = next(w.shape[0] for name, w in weights_l.items() if "embed_tokens" in name)
    assert row_width == vocab  # the reused reference worker sent logits
    assert metrics_h["kl_full"] > 1e-6
    assert metrics_l["kl_full"] == pytest.approx(metrics_h["kl_full"], rel=1e-4, abs=1e-7)
    assert metrics_l["kl_k3"] == pytest.approx(metrics_h["kl_k3"], rel=1e-4, abs=1e-7)
    _assert_same_update(weights_l, weights_h, start, rel=1e-4)
