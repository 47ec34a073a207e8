"""Run outputs: metrics.jsonl records, truncation on resume, TensorBoard events."""

from __future__ import annotations

import json

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
