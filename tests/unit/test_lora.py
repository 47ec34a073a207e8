"""LoRA on a tiny Qwen2 model in float64: pi_ref from the base weights with the adapters disabled
equals pi_ref from a reference worker's copy of the base model (same log-probs, same KL, same
loss); merged and adapter-only sync leave the receiver with the same weights bit for bit, equal to
peft's own merge; bad target modules are one-line config errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("deepspeed")

from system.config import ConfigError  # noqa: E402
from tests.unit.test_learner import learner, shard, tiny_qwen2  # noqa: E402
from workers.lora import AdapterMerger, adapter_view, apply_lora, merged_view  # noqa: E402
from workers.weight_sync import checksum  # noqa: E402

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def trained_lora(tied: bool = False):
    """(base model, LoRA-wrapped copy with adapters moved away from their zero start)."""
    base = tiny_qwen2(tied)
    policy = apply_lora(copy.deepcopy(base), LORA).to(torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return base, policy


def test_only_the_adapters_train():
    _, policy = trained_lora()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("kl_mode", ["full", "k3"])
def test_reference_from_base_with_adapters_off_equals_reference_worker(kl_mode):
    base, policy = trained_lora()
    worker, base_rows = learner(policy, base, "hidden", kl_mode)  # rows as the reference worker sends them
    s = shard()
    worker.prepare(s, None)  # reference.source=adapters_off: the learner computes them
    off = dict(worker.shard)
    worker.prepare(s, base_rows)  # reference.source=worker
    on = dict(worker.shard)
    torch.testing.assert_close(off["ref_rows"], on["ref_rows"], rtol=0, atol=1e-12)
    torch.testing.assert_close(off["ref_logp"], on["ref_logp"], rtol=0, atol=1e-12)
    # the adapters matter: pi_theta is not pi_ref, so the KL is not zero
    assert not torch.allclose(off["old_logp"], off["ref_logp"])
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0], dtype=torch.float64)
    losses = []
    for state in (off, on):
        worker.shard = state
        mb = worker._micro_batches(dict(state, advantages=adv))[0][0]
        loss, _, stats = worker._minibatch_loss(mb, normalizer=float(s["loss_mask"].sum()), first=True)
        losses.append((float(loss.detach()), stats["kl_full"], stats["kl_k3"]))
    assert losses[0][1] > 1e-4
    assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merged_and_adapter_sync_give_the_same_weights(tied):
    base, policy = trained_lora(tied)
    merged = {n: e.make() for n, e in merged_view(policy).items()}
    receiver = dict(base.named_parameters())
    assert merged.keys() == receiver.keys()  # the rollout model's own names

    # peft's merge agrees (it computes (B @ A) * s; ours (s * B) @ A, the same up to rounding)
    reference = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-12, atol=1e-12)

    # adapter-only: the receiver merges A and s * B into the base weights it keeps, twice
    merger = AdapterMerger(receiver)
    sent = adapter_view(policy)
    assert sum(e.make().numel() for e in sent.values()) < sum(t.numel() for t in merged.values())
    for _ in range(2):
        for name, entry in sent.items():
            merger.add(name, entry.make())
    for name, tensor in merged.items():
        assert torch.equal(receiver[name].data, tensor), name
    assert checksum(receiver.items()) == checksum(merged.items())


@pytest.mark.parametrize("targets, reason", [
    (["nothing_here"], "not found"),
    (["lm_head"], "output head"),
    (["embed_tokens"], "linear layers only"),
])
def test_bad_target_modules_are_config_errors(targets, reason):
    with pytest.raises(ConfigError) as err:
        apply_lora(tiny_qwen2(False), dict(LORA, target_modules=targets))
    message = str(err.value)
    assert message.startswith("learner.lora.target_modules") and reason in message and "\n" not in message
