"""Prompt datasets from local files: load rows, render prompts with a template, drop long prompts.

Sources (by path): JSON Lines (.jsonl, or .json holding JSON lines or one array), Parquet
(.parquet, read with pyarrow in batches), or a directory written by Hugging Face
`datasets.save_to_disk` (needs the `datasets` package; a DatasetDict uses its "train" split or its
only split; point the path at a split's folder to pick another).

Fields are configurable and may be nested with dots: answer_field="reward_model.ground_truth"
reads row["reward_model"]["ground_truth"] (a literal top-level key with dots wins). A prompt may
be a string or a one-message chat list [{"role": "user", "content": ...}] (the verl format).
Rows without a usable prompt or answer are skipped and counted by reason; a source with no
usable row at all is an error naming the fields and the path.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

_MISSING = object()
_PARQUET_BATCH_ROWS = 4096
_TOKENIZE_BATCH = 1024
_SKIP_LINES_KEPT = 3  # line numbers kept per skip reason


# ---- loading ---------------------------------------------------------------------------------

def load_prompts(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
                 limit: Optional[int] = None) -> tuple[list[dict], dict[str, Any]]:
    """Rows [{"prompt": str, "answer": str}] from a local dataset, and stats about the read.

    stats: path, rows_read, rows_kept, rows_skipped, skip_reasons {reason: count}, skip_lines
    {reason: the first few line numbers (JSON Lines) or row numbers (other sources), from 1}, and
    lines: the line or row number of each kept row (prompts.py names rows by it, then drops it).
    Raises FileNotFoundError for a missing path, ValueError for an empty or unreadable source or
    one with no usable row. limit: stop after this many usable rows.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"load_prompts {path}: limit must be >= 1 or None, got {limit}")
    if not path.exists():
        raise FileNotFoundError(f"prompt dataset {path}: no such file or directory")
    rows: list[dict] = []
    lines: list[int] = []
    reasons: Counter = Counter()
    skip_lines: dict[str, list[int]] = {}
    n_read = 0
    first_keys: Optional[list] = None
    for line, record in _iter_records(path):
        n_read += 1
        row, reason = _to_row(record, prompt_field, answer_field)
        if first_keys is None and isinstance(record, dict):
            first_keys = sorted(record)
        if row is None:
            reasons[reason] += 1
            if len(skip_lines.setdefault(reason, [])) < _SKIP_LINES_KEPT:
                skip_lines[reason].append(line)
            continue
        rows.append(row)
        lines.append(line)
        if limit is not None and len(rows) >= limit:
            break
    if n_read == 0:
        raise ValueError(f"prompt dataset {path}: no rows (empty file or dataset)")
    stats = {"path": str(path), "rows_read": n_read, "rows_kept": len(rows),
             "rows_skipped": sum(reasons.values()), "skip_reasons": dict(reasons),
             "skip_lines": skip_lines, "lines": lines}
    if not rows:
        raise ValueError(
            f"prompt dataset {path}: no usable row among {n_read} (prompt_field={prompt_field!r}, "
            f"answer_field={answer_field!r}); skipped: {dict(reasons)}; first row's fields: {first_keys}")
    return rows, stats


def _iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number from 1, raw record: a dict, or whatever a JSON line holds) from any
    supported source."""
    if path.is_dir():
        yield from enumerate(_iter_hf_dataset(path), 1)
        return
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ValueError(f"prompt dataset {path}: empty file")
    if suffix in (".jsonl", ".json"):
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from enumerate(_iter_parquet(path), 1)
    else:
        raise ValueError(f"prompt dataset {path}: unsupported format {suffix or '(no suffix)'!r}; "
                         "use .jsonl, .json, .parquet or a `datasets` save_to_disk directory")


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a JSON Lines file; (index from 1, record) of one JSON array. A line
    that is not UTF-8 is skipped like invalid JSON; an array must be UTF-8 as a whole."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # one JSON array (small files only: it is parsed whole)
            try:
                records = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"prompt dataset {path}: not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"prompt dataset {path}: invalid JSON array ({err})") from None
            if not isinstance(records, list):
                raise ValueError(f"prompt dataset {path}: expected one JSON array or JSON lines")
            yield from enumerate(records, 1)
            return
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, _BadJson("not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                yield number, _BadJson("invalid JSON")


class _BadJson:
    """Marks a line that is not valid JSON (or not UTF-8), so it is skipped and counted like any
    other bad row."""

    def __init__(self, reason: str):
        self.reason = reason


def _iter_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"prompt dataset {path}: not a readable Parquet file ({err})") from None
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # noqa: BLE001 - a damaged page surfaces only when it is read
            raise ValueError(f"prompt dataset {path}: damaged Parquet data ({err})") from None
        if batch is None:
            return
        yield from batch.to_pylist()


def _iter_hf_dataset(path: Path) -> Iterator[dict]:
    is_dict = (path / "dataset_dict.json").exists()
    if not is_dict and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        raise ValueError(f"prompt dataset {path}: a directory, but not one written by "
                         "datasets' save_to_disk (no dataset_info.json / dataset_dict.json)")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"prompt dataset {path}: reading a `datasets` directory needs the datasets "
                         "package: pip install datasets") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            raise ValueError(f"prompt dataset {path}: a DatasetDict with splits {splits} and no 'train'; "
                             "point the path at one split's folder")
    yield from data


def _get_field(record: dict, field: str) -> Any:
    """record[field], following dots into nested dicts unless the dotted key exists as is."""
    if field in record:
        return record[field]
    value: Any = record
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _to_row(record: Any, prompt_field: str, answer_field: str) -> tuple[Optional[dict], str]:
    """({"prompt", "answer"}, "") for a usable record, else (None, the reason it was skipped)."""
    if isinstance(record, _BadJson):
        return None, record.reason
    if not isinstance(record, dict):
        return None, "not a JSON object"
    prompt = _get_field(record, prompt_field)
    answer = _get_field(record, answer_field)
    if prompt is _MISSING or prompt is None:
        return None, f"missing field {prompt_field!r}"
    if answer is _MISSING or answer is None:
        return None, f"missing field {answer_field!r}"
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if len(prompt) != 1 or len(users) != 1:
            return None, f"{prompt_field!r} is a chat list, but not of exactly one user message"
        prompt = users[0].get("content")
    if not isinstance(prompt, str) or not prompt.strip():
        return None, f"{prompt_field!r} is not a non-empty string"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return None, f"{answer_field!r} is not a string or number"
    answer = str(answer)
    if not answer.strip():
        return None, f"{answer_field!r} is empty"
    return {"prompt": prompt, "answer": answer}, ""


# ---- templates -------------------------------------------------------------------------------

def render_prompt(tokenizer: Any, prompt: str, template: str) -> str:
    """The text given to the model for a prompt.

    template: "chat" (the tokenizer's chat template, one user turn, generation prompt added),
    "plain" (the prompt as is), or any other string containing "{prompt}", which is replaced by
    the prompt (other braces are left alone, so "\\boxed{}" in an instruction is fine).
    """
    if template == "plain":
        return prompt
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"template 'chat': tokenizer {name!r} has no chat template; "
                             "use template 'plain' or a string containing {prompt}")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if "{prompt}" not in template:
        raise ValueError(f"template {template!r}: expected 'chat', 'plain' or a string containing {{prompt}}")
    return template.replace("{prompt}", prompt)


def filter_long(rows: list[dict], tokenizer: Any, template: str,
                max_prompt_tokens: int) -> tuple[list[dict], int]:
    """Rows whose rendered prompt fits in max_prompt_tokens tokens, and how many were dropped.

    Tokens are counted as the rollout sees them: with the tokenizer's special tokens for "plain"
    and format templates, without for "chat" (the chat template writes its own).
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"filter_long: max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    texts = [render_prompt(tokenizer, row["prompt"], template) for row in rows]
    add_special = template != "chat"
    kept = []
    for start in range(0, len(rows), _TOKENIZE_BATCH):  # fast tokenizers encode a list in parallel
        chunk = slice(start, start + _TOKENIZE_BATCH)
        ids = tokenizer(texts[chunk], add_special_tokens=add_special)["input_ids"]
        kept += [row for row, row_ids in zip(rows[chunk], ids) if len(row_ids) <= max_prompt_tokens]
    return kept, len(rows) - len(kept)
