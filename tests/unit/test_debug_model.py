"""The debug model: a real HF model directory that loads, round-trips the task's text, generates, caches."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from system import debug_model
from system.data.synthetic import make_task

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, two threads make these tests ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("debug_model")
    debug_model.build_tokenizer(path)
    debug_model.build_model(path, seed=0, **TINY)
    return path


def test_directory_is_a_loadable_qwen2_checkpoint(model_dir):
    names = set(os.listdir(model_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vocab_size"] % 8 == 0 and config["vocab_size"] >= len(debug_model.TOKENS)
    assert config["head_dim"] == 64 and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == config["dtype"] == "float32"  # names for transformers 4 and 5
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (debug_model.EOS_ID, debug_model.PAD_ID)


def test_default_model_has_head_dim_64():
    config = debug_model.DEFAULT_SETTINGS["model"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64


def test_tokenizer_round_trips_task_text_exactly(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|endoftext|>"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (debug_model.PAD_ID, debug_model.EOS_ID)
    train, heldout = make_task(0, 50, 10, n_terms=4, ops="+-*", show_steps=True)
    for text in [ex["prompt"] + ex["solution"] for ex in train + heldout] + ["7+5-3=9", "-10", "0123456789+-*="]:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, no BOS
        assert tokenizer.decode(ids) == text
    ids = tokenizer("12")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == "12<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_encode_examples_labels_only_solution_and_eos():
    input_ids, labels = debug_model.encode_examples([{"prompt": "1+2=", "solution": "3"},
                                                     {"prompt": "9-9+1=", "solution": "0+1=1"}])
    assert input_ids.shape == labels.shape == (2, 12)
    assert labels[0].tolist() == [-100] * 4 + [input_ids[0, 4].item(), debug_model.EOS_ID] + [-100] * 6
    assert (labels[1, :6] == -100).all() and labels[1, 6:11].tolist() == input_ids[1, 6:11].tolist()
    assert labels[1, 11].item() == debug_model.EOS_ID
    assert input_ids[0, 6:].tolist() == [debug_model.PAD_ID] * 6


def test_model_loads_and_generates_with_left_padding(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer(["1+2=", "11+2="], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0].item() == 0  # left padding
    out = model.generate(**batch, max_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert out.shape[0] == 2 and 5 < out.shape[1] <= 8
    data = [{"prompt": "1+2=", "solution": "3", "answer": "3"}] * 3
    assert debug_model.greedy_accuracy(model, tokenizer, data) in (0.0, 1.0)


def test_warm_start_lowers_the_loss_and_saves(tmp_path):
    debug_model.build_tokenizer(tmp_path)
    debug_model.build_model(tmp_path, seed=0, **TINY)
    before = (tmp_path / "model.safetensors").read_bytes()
    train, _ = make_task(0, 200, 10)
    metrics = debug_model.warm_start(tmp_path, train, steps=30, lr=3e-3, batch_size=32, seed=0)
    assert metrics["steps"] == 30 and metrics["loss_last"] < metrics["loss_first"]
    assert (tmp_path / "model.safetensors").read_bytes() != before


def test_warm_start_stops_at_the_target_accuracy(tmp_path):
    debug_model.build_tokenizer(tmp_path)
    debug_model.build_model(tmp_path, seed=0, **TINY)
    train, _ = make_task(0, 200, 10)
    # Any model reaches 0% at the first check, so the run stops there.
    metrics = debug_model.warm_start(tmp_path, train, steps=50, lr=1e-3, batch_size=8, seed=0,
                                     stop_at_accuracy=0.0, check_every=5)
    assert metrics["steps"] == 5 and metrics["train_probe_accuracy"] is not None


def test_ensure_debug_model_builds_once_then_returns_the_cache(tmp_path, capsys):
    settings = {"model": TINY, "warm_start": {"steps": 2, "batch_size": 8, "stop_at_accuracy": None}}
    task = {"n_train": 100, "n_eval": 20}
    first = debug_model.ensure_debug_model(tmp_path, settings, task)
    assert "warm start" in capsys.readouterr().out
    second = debug_model.ensure_debug_model(tmp_path, settings, task)
    assert second == first and "cached" in capsys.readouterr().out
    assert [p for p in os.listdir(tmp_path) if p.startswith(".building")] == []
    assert AutoModelForCausalLM.from_pretrained(first).config.hidden_size == 64
    assert "rope_theta" in json.loads((Path(first) / "config.json").read_text())  # kept after warm start
    record = json.loads((Path(first) / "debug_model.json").read_text())
    assert record["warm_start"]["steps"] == 2 and record["settings"]["model"] == TINY | {"max_position_embeddings": 128}
    assert record["settings"]["task"] == debug_model.resolve_task(task)
    other = debug_model.ensure_debug_model(tmp_path, {**settings, "seed": 1}, task)
    assert other != first
    other_task = debug_model.ensure_debug_model(tmp_path, settings, {**task, "show_steps": True})
    assert other_task not in (first, other)  # the warm start learns another task: its own entry


def test_unknown_setting_is_an_error(tmp_path):
    with pytest.raises(KeyError, match="hiden_size"):
        debug_model.ensure_debug_model(tmp_path, {"model": {"hiden_size": 64}})
    with pytest.raises(KeyError, match="n_term"):
        debug_model.ensure_debug_model(tmp_path, {}, {"n_term": 4})
    with pytest.raises(KeyError, match="data.synthetic"):
        debug_model.ensure_debug_model(tmp_path, {"task": {"n_terms": 4}})


def test_the_synthetic_task_config_defaults_are_make_tasks():
    """data.synthetic's defaults (system/config.py) are make_task's: the debug model built
    without a config (tests, benchmarks) and the debug run's task are the same task."""
    from system.config import SyntheticTaskConfig

    assert dataclasses.asdict(SyntheticTaskConfig()) == debug_model.resolve_task(None)
