"""Run outputs: metrics.jsonl records, truncation on resume, TensorBoard events."""

from __future__ import annotations

import json

import pytest

from system.metrics import MetricsLogger, summary_table


def test_records_truncation_on_resume_and_tensorboard(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step), "note": "x"})
    log.log(3, {"greedy_accuracy": 0.5}, kind="eval")
    log.truncate_after(2)  # resumed from step 2: steps 3 will be written again
    log.log(3, {"loss": 30.0})
    log.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r.get("loss")) for r in records] == [
        ("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0)]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_console_line_and_summary_table():
    line = MetricsLogger.console_line(3, 10, {"reward_mean": 0.25, "kl_full": 0.0123, "step_s": 1.5})
    assert line == "step 3/10 | reward 0.250 | kl 0.0123 | s 1.5"
    table = summary_table([("greedy_accuracy", "0.390", "0.630")]).splitlines()
    assert table[1].split() == ["metric", "|", "start", "|", "end"]
    assert table[3].split() == ["greedy_accuracy", "|", "0.390", "|", "0.630"]


def test_learner_steps_combine_over_ranks_as_one_rank_would():
    """Two ranks x two steps against the whole minibatch's values worked by hand: loss shares add up,
    token means weight by tokens, extremes are over ranks and steps (a rank with no tokens reports
    a placeholder ratio of 1 that must not count), the global gradient norm is averaged over steps."""
    from system.metrics import reduce_learner_steps

    rank0 = [{"loss": -0.25, "pg_loss": -0.5, "tokens": 3, "kl_full": 0.1, "ratio_min": 0.9,
              "ratio_max": 1.1, "grad_norm": 2.0, "behavior_logp_gap": 0.3},
             {"loss": 0.5, "pg_loss": 0.25, "tokens": 1, "kl_full": 0.5, "ratio_min": 0.95,
              "ratio_max": 1.05, "grad_norm": 4.0}]
    rank1 = [{"loss": -0.75, "pg_loss": -1.0, "tokens": 1, "kl_full": 0.5, "ratio_min": 0.8,
              "ratio_max": 1.3, "grad_norm": 2.0, "behavior_logp_gap": 0.7},
             {"loss": 0.0, "pg_loss": 0.0, "tokens": 0, "kl_full": 0.0, "ratio_min": 1.0,
              "ratio_max": 1.0, "grad_norm": 4.0}]
    out = reduce_learner_steps([rank0, rank1])
    assert out["loss"] == pytest.approx(((-0.25 - 0.75) + 0.5) / 2)
    assert out["pg_loss"] == pytest.approx(((-0.5 - 1.0) + 0.25) / 2)
    assert out["kl_full"] == pytest.approx((3 * 0.1 + 1 * 0.5 + 1 * 0.5) / 5)
    assert out["behavior_logp_gap"] == pytest.approx((3 * 0.3 + 1 * 0.7) / 4)  # first step only
    assert (out["ratio_min"], out["ratio_max"]) == (0.8, 1.3)
    assert out["grad_norm"] == pytest.approx(3.0)
    assert "tokens" not in out
    with pytest.raises(KeyError, match="new_stat"):
        reduce_learner_steps([[{"tokens": 1, "new_stat": 0.0}]])
