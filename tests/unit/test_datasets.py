"""Prompt datasets: JSONL / Parquet / `datasets` directories, bad rows, templates, long prompts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from system.data.datasets import filter_long, load_prompts, render_prompt

ROWS = [
    {"question": "What is 2 + 2 ?", "solution": "4", "meta": {"gt": "4"}},
    {"question": "What is 3 + 5 ?", "solution": 8, "meta": {"gt": "8"}},
    {"question": "What is 1 + 1 ?", "solution": "2", "meta": {"gt": "2"}},
]


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tokenizer():
    """A tiny word-level tokenizer with a chat template, built here (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[BOS]", "<user>", "</user>", "<assistant>", "What", "is", "+", "?", "1", "2", "3", "5"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> "
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def test_jsonl_with_field_names_and_nested_keys(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    rows, stats = load_prompts(path, prompt_field="question", answer_field="solution")
    assert rows == [{"prompt": r["question"], "answer": str(r["solution"])} for r in ROWS]
    assert stats["rows_read"] == 3 and stats["rows_kept"] == 3 and stats["rows_skipped"] == 0
    rows, _ = load_prompts(path, prompt_field="question", answer_field="meta.gt", limit=2)
    assert [r["answer"] for r in rows] == ["4", "8"]


def test_parquet_and_json_array_read_the_same_rows(tmp_path):
    pq.write_table(pa.Table.from_pylist([{**r, "solution": str(r["solution"])} for r in ROWS]),
                   tmp_path / "train.parquet")
    (tmp_path / "train.json").write_text(json.dumps(ROWS))
    expected, _ = load_prompts(write_jsonl(tmp_path / "t.jsonl", ROWS), "question", "meta.gt")
    for name in ("train.parquet", "train.json"):
        rows, stats = load_prompts(tmp_path / name, "question", "meta.gt")
        assert rows == expected and stats["rows_kept"] == 3


def test_verl_style_parquet(tmp_path):
    records = [{"prompt": [{"role": "user", "content": "What is 2 + 2 ?"}],
                "reward_model": {"ground_truth": "4", "style": "rule"}}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "verl.parquet")
    rows, _ = load_prompts(tmp_path / "verl.parquet", answer_field="reward_model.ground_truth")
    assert rows == [{"prompt": "What is 2 + 2 ?", "answer": "4"}]


def test_bad_rows_are_skipped_and_counted(tmp_path):
    records = ROWS + [
        {"question": "no answer here"},
        {"solution": "7"},
        {"question": "   ", "solution": "1"},
        {"question": "list answer", "solution": [1, 2]},
        ["not", "an", "object"],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records, extra_lines=["{broken json", ""])
    rows, stats = load_prompts(path, "question", "solution")
    assert len(rows) == 3
    assert stats["rows_read"] == 9 and stats["rows_skipped"] == 6
    assert stats["skip_reasons"] == {
        "missing field 'solution'": 1,
        "missing field 'question'": 1,
        "'question' is not a non-empty string": 1,
        "'solution' is not a string or number": 1,
        "not a JSON object": 1,
        "invalid JSON": 1,
    }


def test_no_usable_row_names_the_fields_and_path(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError) as err:
        load_prompts(path)  # default fields "prompt" / "answer" are not there
    message = str(err.value)
    assert str(path) in message and "'prompt'" in message and "'answer'" in message
    assert "question" in message  # the fields that are there, to help fix the config
    assert "\n" not in message


def test_missing_empty_and_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.jsonl: no rows"):
        load_prompts(tmp_path / "blank.jsonl")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="empty.parquet: no rows"):
        load_prompts(tmp_path / "empty.parquet")
    (tmp_path / "data.csv").write_text("prompt,answer\n1,2\n")
    with pytest.raises(ValueError, match="unsupported format '.csv'"):
        load_prompts(tmp_path / "data.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_prompts(tmp_path / "bad.parquet")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_prompts(tmp_path / "somedir")
    with pytest.raises(ValueError, match="limit"):
        load_prompts(write_jsonl(tmp_path / "t.jsonl", ROWS), "question", "solution", limit=0)


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    data = datasets.Dataset.from_list([{"q": r["question"], "a": str(r["solution"])} for r in ROWS])
    data.save_to_disk(str(tmp_path / "ds"))
    rows, stats = load_prompts(tmp_path / "ds", "q", "a")
    assert [r["answer"] for r in rows] == ["4", "8", "2"] and stats["rows_kept"] == 3
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_prompts(tmp_path / "dd", "q", "a")[0]) == 3
    assert len(load_prompts(tmp_path / "dd" / "test", "q", "a")[0]) == 1
    datasets.DatasetDict({"a": data, "b": data}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match="splits"):
        load_prompts(tmp_path / "ab", "q", "a")


def test_render_prompt_templates(tokenizer):
    assert render_prompt(None, "What is 2 + 2 ?", "plain") == "What is 2 + 2 ?"
    assert (render_prompt(tokenizer, "What is 1 + 1 ?", "chat")
            == "<user> What is 1 + 1 ? </user> <assistant>")
    template = "Put the answer in \\boxed{}.\nQ: {prompt}\nA:"
    assert render_prompt(None, "What is 3 ?", template) == "Put the answer in \\boxed{}.\nQ: What is 3 ?\nA:"
    with pytest.raises(ValueError, match="containing {prompt}"):
        render_prompt(None, "x", "Question: {question}")


def test_chat_template_missing_is_a_clear_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(tokenizer, "x", "chat")


def test_filter_long_counts_rendered_tokens(tokenizer):
    rows = [{"prompt": "What is 1 + 1 ?", "answer": "2"},  # 6 tokens; 9 with the chat template
            {"prompt": "What is 2 + 3 + 5 + 1 ?", "answer": "11"},  # 10 tokens; 13 with it
            {"prompt": "1", "answer": "1"}]  # 1 token; 4 with it
    kept, dropped = filter_long(rows, tokenizer, "plain", max_prompt_tokens=6)
    assert kept == [rows[0], rows[2]] and dropped == 1
    kept, dropped = filter_long(rows, tokenizer, "chat", max_prompt_tokens=9)
    assert kept == [rows[0], rows[2]] and dropped == 1
    kept, dropped = filter_long(rows, tokenizer, "chat", max_prompt_tokens=8)
    assert kept == [rows[2]] and dropped == 2
    assert filter_long([], tokenizer, "plain", 5) == ([], 0)
