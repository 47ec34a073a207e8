"""Bad input stops the run before anything starts, with one line naming the problem and exit code
2: unknown or mistyped config keys, impossible settings, a missing model, a dataset that is
missing, empty, has no usable row, or whose prompts are all over the length limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.test_rewards_and_data import ROWS, debug_model_dir, file_data, write_dataset


def _without_warnings(stderr: str) -> str:
    """stderr less the "config warning:" lines (keys the mode ignores, e.g. debug.yaml's
    model.debug_settings once model.path is overridden) and "data warning:" lines (no held-out
    set): they come before the error, by design."""
    return "\n".join(x for x in stderr.strip().splitlines()
                     if not x.startswith(("config warning: ", "data warning: ")))


def _main_error(capsys, *overrides) -> str:
    from system.train import main

    rc = main(["--config", "configs/debug.yaml", *overrides])
    err = _without_warnings(capsys.readouterr().err)
    assert rc == 2, err
    assert err.startswith("config error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, expected", [
    ("trainer.stepz=3", "trainer.stepz: Key 'stepz' not in 'TrainerConfig'"),
    ("faults.max_actor_restart=2", "faults.max_actor_restart"),
    ("learner.lr=fast", "learner.lr"),
    ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
    ("learner.minibatches=3", "must divide evenly"),
    ("faults.nan_loss_at=[0]", "faults.nan_loss_at: must be a list of step numbers >= 1"),
    ("faults.max_nonfinite_in_a_row=0", "faults.max_nonfinite_in_a_row: must be >= 1"),
    ("faults.max_actor_restarts=-1", "faults.max_actor_restarts: must be >= 0"),
])
def test_bad_config_names_the_key(capsys, tmp_path, override, expected):
    assert expected in _main_error(capsys, f"output_dir={tmp_path}", override)


def test_missing_model_path_is_named(capsys, tmp_path):
    err = _main_error(capsys, f"output_dir={tmp_path}", f"model.path={tmp_path}/no_model",
                      "data.source=file", f"data.train_path={tmp_path}/train.jsonl")
    assert f"model.path: '{tmp_path}/no_model' is not a model directory" in err


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file or directory"),
    ("empty", "empty file"),
    ("no_fields", "no usable row among 2 (prompt_field='question', answer_field='solution')"),
    ("too_long", "data.train_path: no usable prompt in"),
])
def test_unusable_dataset_is_named(capsys, tmp_path, case, expected):
    path = tmp_path / "train.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "no_fields":
        write_dataset(path, [{"q": "1+2=", "a": "3"}, {"question": "1+1="}])
    elif case == "too_long":
        write_dataset(path, ROWS[:4])
    err = _main_error(capsys, f"output_dir={tmp_path}", *file_data(path, "data.max_prompt_tokens=2"))
    assert err.startswith("config error: data") and expected in err, err
    if case != "too_long":
        assert str(path) in err


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    debug_model_dir()
    proc = subprocess.run([sys.executable, "-m", "system.train", "--config", "configs/debug.yaml",
                           f"output_dir={tmp_path}", *file_data(tmp_path / "nope.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _without_warnings(proc.stderr) == (f"config error: data: prompt dataset {tmp_path}/nope.jsonl: "
                                              "no such file or directory")


def test_model_whose_logits_are_not_hidden_times_head_is_refused(capsys, tmp_path):
    """The fused KL op computes logits as hidden @ W.T: a model whose config soft-caps them (Gemma 2)
    stops the run with one line in the driver's checks, before Ray or any actor starts (the learners
    check the loaded model's numbers too: tests/unit/test_output_head.py)."""
    import shutil

    from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM

    debug = debug_model_dir()
    model_dir = tmp_path / "gemma2"
    vocab = AutoConfig.from_pretrained(debug).vocab_size
    Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=8)).save_pretrained(model_dir)
    for src in Path(debug).glob("*token*"):  # the debug model's tokenizer
        shutil.copy(src, model_dir / src.name)
    data = write_dataset(tmp_path / "train.jsonl", [ROWS[0], ROWS[3]] * 8)
    capsys.readouterr()  # drop save_pretrained's progress bar
    startups = Path(os.environ["GRPO_STARTUP_LOG"])  # tests/conftest.py: a line per start-up
    before = startups.read_text() if startups.exists() else ""
    err = _main_error(capsys, f"output_dir={tmp_path}", *file_data(data), f"model.path={model_dir}",
                      "eval.size=0", "trainer.prompts_per_step=8", "rollout.group_size=4")
    assert (startups.read_text() if startups.exists() else "") == before  # no actor started
    assert err == ("config error: model.path: Gemma2ForCausalLM transforms its logits after the output "
                   "head (final_logit_softcapping=30.0); the learner computes logits as hidden @ W.T only")
