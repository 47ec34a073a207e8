"""A reward that hangs or raises scores 0 and is counted, and the run completes; dataset rows without
the configured fields and prompts over the length limit are skipped and counted ([data] line and
metrics.jsonl)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

ROWS = [
    {"question": "1+2=", "solution": "3"},
    {"question": "4-1=", "solution": "hang"},  # the reward sleeps past reward.timeout_s
    {"question": "2+2=", "solution": "boom"},  # the reward raises
    {"question": "5+3=", "solution": "8"},
    {"question": "9-9="},  # no answer field
    {"prompt": "1+1=", "solution": "2"},  # no prompt field
    {"question": "1+2+3+4+5+6+7+8+9+1+2+3+4+5+6+7+8+9=", "solution": "90"},  # > 16 tokens
]


def write_dataset(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def debug_model_dir() -> str:
    from system.debug_model import ensure_debug_model

    return ensure_debug_model(".cache/debug_model", {"warm_start": {"steps": 30}})


def file_data(path, *extra) -> list[str]:
    return [f"model.path={debug_model_dir()}", "data.source=file", f"data.train_path={path}",
            "data.template=plain", "data.prompt_field=question", "data.answer_field=solution", *extra]


def test_hanging_and_raising_rewards_and_bad_rows_are_counted_and_the_run_completes(faults_run,
                                                                                   tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", ROWS, ["{not json\n"])
    run = faults_run("rewards", *file_data(data, "data.max_prompt_tokens=16"), "trainer.steps=2",
                     "trainer.prompts_per_step=4",  # every step holds all four usable prompts
                     "reward.functions=[{name: 'tests.faults.fault_rewards:flaky'}]",
                     "reward.num_workers=2", "reward.timeout_s=1.0")
    assert run.rc == 0, run.err
    assert run.steps() == [1, 2]
    for r in run.records():  # group_size 4: four samples per prompt
        assert r["reward_timeouts"] == 4 and r["reward_errors"] == 4, r
    [stats] = run.records("data")
    assert stats["train_prompts"] == 4
    assert stats["rows_read"] == 8 and stats["rows_skipped"] == 3
    assert stats["skip_reasons"] == {"missing field 'solution'": 1, "missing field 'question'": 1,
                                     "invalid JSON": 1}
    assert stats["skip_lines"] == {"missing field 'solution'": [5], "missing field 'question'": [6],
                                   "invalid JSON": [8]}
    assert stats["train_dropped_long"] == 1
    data_line = next(line for line in run.out.splitlines() if line.startswith("[data]"))
    assert data_line == (f"[data] 4 train prompts from {data}, train rows skipped: 1 missing field "
                         "'solution' (line 5); 1 missing field 'question' (line 6); 1 invalid JSON "
                         "(line 8), 1 train prompts over data.max_prompt_tokens=16 dropped, "
                         "no held-out evaluation"), data_line
