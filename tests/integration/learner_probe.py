"""One DeepSpeed learner rank built as the trainer builds it (world size 1, gloo), probed while it
runs `prepare` and `update`; prints one JSON line. Run in a process of its own (DeepSpeed's process
group is global): tests/integration/test_learner_engine.py.

    python -m tests.integration.learner_probe MODEL_DIR ZERO_STAGE

What it reports, for the pi_old paths that run the policy in the learner (trainer.rollout_ahead=0,
no sampler log-probs; algo.pi_old=proximal) and then an update with gradient checkpointing on:
- the training flag of every decoder layer at each of its forward calls, in prepare and in update;
- how many layer calls went through the gradient-checkpointing function during the update;
- the largest difference between the learner's pi_old / pi_prox log-probs and the same model's
  Hugging Face logits / T, log-softmaxed (weights gathered from the engine, so ZeRO-3 included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch


def _naive_logprobs(model_path: str, weights: dict, shard: dict, temperature: float) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.load_state_dict(weights, strict=False)  # a tied head is the embedding's weight
    mask = shard["loss_mask"].bool()
    with torch.no_grad():
        logits = model(input_ids=shard["input_ids"], attention_mask=shard["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1][mask].float() / temperature, dim=-1)
    return lp.gather(1, shard["input_ids"][:, 1:][mask][:, None]).squeeze(1)


def main(model_path: str, zero_stage: int) -> dict:
    from system.config import load_config
    from system.settings import learner_settings
    from workers.learner import LearnerWorker

    cfg = load_config("configs/debug.yaml", [
        "learner.num_ranks=1", "learner.minibatches=2", "rollout.group_size=2",
        "trainer.prompts_per_step=2", f"learner.zero_stage={zero_stage}", "model.dtype=float32",
        "learner.gradient_checkpointing=true", "trainer.rollout_ahead=0", "rollout.temperature=0.7"])
    c = learner_settings(cfg)
    worker = LearnerWorker(0, 1, model_path, c)
    worker.init_process_group(*worker.address())
    worker.build()

    policy = worker.engine.module.policy
    layers = policy.model.layers
    seen: list[tuple[str, bool]] = []
    phase = ["build"]
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append((phase[0], m.training)))
    checkpointed = [0]
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            checkpointed[0] += 1
            return _inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted

    g = torch.Generator().manual_seed(0)
    rows, prompt, response = 4, 5, 7
    L = prompt + response
    loss_mask = torch.zeros(rows, L - 1)
    loss_mask[:, prompt - 1:] = 1
    shard = {"input_ids": torch.randint(0, 90, (rows, L), generator=g),
             "attention_mask": torch.ones(rows, L, dtype=torch.long), "loss_mask": loss_mask}
    M = int(loss_mask.sum())
    H = policy.config.hidden_size
    out = {}

    # trainer.rollout_ahead=0: no sampler log-probs, the learner computes pi_old itself
    phase[0] = "prepare"
    worker.prepare(shard, torch.randn(M, H, generator=g))
    want = _naive_logprobs(model_path, worker.weights(), shard, c.temperature)
    out["pi_old_err"] = float((worker.shard["old_logp"][loss_mask.bool()] - want).abs().max())
    phase[0] = "update"
    worker.update(torch.randn(rows, generator=g), [M / 2, M / 2])
    out["checkpointed_update"] = checkpointed[0]

    # algo.pi_old=proximal with the sampler's log-probs: pi_prox from the (updated) policy
    worker.settings = dataclasses.replace(c, pi_old="proximal")
    phase[0] = "prepare"
    worker.prepare(dict(shard, behavior_logp=torch.zeros(rows, L - 1)), torch.randn(M, H, generator=g))
    want = _naive_logprobs(model_path, worker.weights(), shard, c.temperature)
    out["pi_prox_err"] = float((worker.shard["old_logp"][loss_mask.bool()] - want).abs().max())
    phase[0] = "update"
    worker.update(torch.randn(rows, generator=g), [M / 2, M / 2])
    out["training"] = {p: sorted({t for q, t in seen if q == p}) for p in ("prepare", "update")}
    out["layer_calls"] = {p: sum(1 for q, _ in seen if q == p) for p in ("prepare", "update")}
    return out


def accumulate(model_path: str, zero_stage: int) -> dict:
    """One SGD step (the update is -lr * gradient) on rows of different lengths, run as one padded
    micro-batch and as token-budget micro-batches (with a stand-in) whose gradients
    DeepSpeed accumulates: the largest weight change and the largest difference between the two
    updates."""
    from system.config import load_config
    from system.settings import learner_settings
    from workers.learner import LearnerWorker

    cfg = load_config("configs/debug.yaml", [
        "learner.num_ranks=1", "learner.minibatches=1", "rollout.group_size=2",
        "trainer.prompts_per_step=2", f"learner.zero_stage={zero_stage}", "model.dtype=float32",
        "learner.optimizer=sgd", "learner.lr=0.5", "learner.grad_clip=0", "learner.warmup_steps=0",
        "trainer.rollout_ahead=0"])
    worker = LearnerWorker(0, 1, model_path, learner_settings(cfg))
    worker.init_process_group(*worker.address())
    worker.build()
    g = torch.Generator().manual_seed(0)
    lengths, prompt = [12, 5, 9, 3], 2
    loss_mask = torch.zeros(4, 11)
    attn = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        loss_mask[i, prompt - 1:n - 1] = 1
    shard = {"input_ids": torch.randint(1, 90, (4, 12), generator=g) * attn, "attention_mask": attn,
             "loss_mask": loss_mask}
    ref = torch.randn(int(loss_mask.sum()), worker.engine.module.policy.config.hidden_size, generator=g)
    adv = torch.randn(4, generator=g)
    deltas = []
    for plan in (None, [[[0], [2, 1], [3], []]]):
        worker.reset(learner_settings(cfg))
        before = worker.weights()
        worker.prepare(shard, ref, plan)
        out = worker.update(adv, [float(loss_mask.sum())])
        assert out["skipped"] == 0
        after = worker.weights()
        deltas.append({k: after[k] - before[k] for k in before})
    return {"max_delta": max(float(d.abs().max()) for d in deltas[0].values()),
            "max_diff": max(float((deltas[0][k] - deltas[1][k]).abs().max()) for k in deltas[0])}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    probe = accumulate if sys.argv[3:] == ["accumulate"] else main
    print("PROBE " + json.dumps(probe(sys.argv[1], int(sys.argv[2]))), flush=True)
