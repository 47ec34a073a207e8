"""The chaos run's schedule and its reward (system/chaos.py): pure functions, no Ray."""

from __future__ import annotations

import pytest

from system import chaos


def test_the_schedule_is_seeded_mixed_and_on_distinct_steps():
    schedule = chaos.plan(seed=0, steps=50, checkpoint_every=10)
    assert schedule == chaos.plan(seed=0, steps=50, checkpoint_every=10)
    assert schedule != chaos.plan(seed=1, steps=50, checkpoint_every=10)
    assert len(schedule) >= 10 and {f.kind for f in schedule} == set(chaos.KINDS)
    steps = [f.step for f in schedule]
    assert len(set(steps)) == len(steps) and all(2 <= s < 50 for s in steps)
    (driver,) = [f.step for f in schedule if f.kind == "driver_killed_mid_checkpoint"]
    assert driver % 10 == 0 and driver > 10  # a checkpoint, with an earlier one to resume from
    with pytest.raises(ValueError, match="too few"):
        chaos.plan(seed=0, steps=12, checkpoint_every=5)


def test_the_reward_faults_strike_only_responses_that_score_0_and_each_token_once(tmp_path):
    assert chaos.exact_unless_told("3", "3", told=str(tmp_path)) == 1.0
    (tmp_path / "raise-7").touch()
    assert chaos.exact_unless_told("3", "3", told=str(tmp_path)) == 1.0  # a right answer: untouched
    assert (tmp_path / "raise-7").exists()
    with pytest.raises(RuntimeError, match="on purpose"):
        chaos.exact_unless_told("4", "3", told=str(tmp_path))
    assert chaos.exact_unless_told("4", "3", told=str(tmp_path)) == 0.0  # the token is spent


def test_overrides_arm_the_nan_steps_and_the_reward(tmp_path):
    hook = chaos.Hook([chaos.Fault(5, "nonfinite_update"), chaos.Fault(6, "reward_hangs")],
                      str(tmp_path / "log.jsonl"), str(tmp_path / "tokens"))
    nan, reward = hook.overrides()
    assert nan == "faults.nan_grad_at=[5]"
    assert "system.chaos:exact_unless_told" in reward and str(tmp_path / "tokens") in reward
    from system.config import load_config

    cfg = load_config("configs/debug.yaml", hook.overrides())
    assert list(cfg.faults.nan_grad_at) == [5]
    assert cfg.reward.functions[0].kwargs["told"] == str(tmp_path / "tokens")
