"""Run outputs: metrics.jsonl records, truncation on resume, TensorBoard events, the console."""

from __future__ import annotations

import io
import json
import sys
import threading

import pytest

from system.metrics import MetricsLogger, progress_bar, summary_table


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
    # kl_seq is a mean over responses: weighted by each rank's responses, not its tokens
    seq = reduce_learner_steps([[{"tokens": 9, "sequences": 3, "kl_seq": 1.0}],
                                [{"tokens": 1, "sequences": 1, "kl_seq": 5.0}]])
    assert seq == {"kl_seq": pytest.approx((3 * 1.0 + 1 * 5.0) / 4)}
    with pytest.raises(KeyError, match="new_stat"):
        reduce_learner_steps([[{"tokens": 1, "new_stat": 0.0}]])


class _Terminal(io.StringIO):
    """One terminal for stdout and stderr, as a console shows them."""

    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list:
    """The rows a terminal shows for `text`: \\r returns to column 0 and overwrites, \\n starts a row,
    ESC[A moves up a row (tqdm's cursor moves)."""
    rows, r, c, i = [[]], 0, 0, 0
    while i < len(text):
        if text.startswith("\x1b[A", i):
            r, i = max(r - 1, 0), i + 3
            continue
        ch, i = text[i], i + 1
        if ch == "\r":
            c = 0
        elif ch == "\n":
            r, c = r + 1, 0
            rows += [[] for _ in range(r + 1 - len(rows))]
        else:
            rows[r] += [" "] * (c + 1 - len(rows[r]))
            rows[r][c], c = ch, c + 1
    return ["".join(row).rstrip() for row in rows]


def test_console_lines_never_share_a_row_with_the_progress_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    lines = [f"step {s}/4 | reward 0.500" for s in range(1, 5)]
    lines += ["(Actor pid=1) from a thread", "warning: on stderr", "[eval] x"]
    with progress_bar(4) as bar:
        assert not bar.disable
        for step in range(1, 5):
            print(lines[step - 1], flush=True)
            bar.update(1)
        # Ray forwards actor output from a thread of its own; a line may come in pieces
        actor = threading.Thread(target=lambda: (print("(Actor pid=1) from", end=""), print(" a thread")))
        actor.start()
        actor.join()
        print("warning: on stderr", file=sys.stderr)
        print("[eval] x")
    rows = _screen(term.getvalue())
    for line in lines:
        assert line in rows, (line, rows)  # whole, and alone on its row
    assert not any("train:" in row and ("step" in row or "Actor" in row) for row in rows), rows
    assert any(row.startswith("train: 100%") for row in rows)


def test_no_bar_off_a_terminal_and_prints_untouched(monkeypatch, capsys):
    with progress_bar(4) as bar:  # capsys: not a terminal, as in a job log
        print("step 1/4")
        bar.update(1)
    assert bar.disable and sys.stdout is not None
    assert capsys.readouterr() == ("step 1/4\n", "")
    with progress_bar(4, enabled=False) as bar:
        assert bar.disable
