"""Prompt sets for a run: the train and held-out rows, tokenized, and a resumable sampler.

A prompt with characters the tokenizer cannot encode (it maps them to its unknown token: the debug
model's tokenizer knows only the synthetic task's characters) stops the run with one line naming
the characters and the row; `describe` is the one console line about what was loaded, skipped
rows with their line numbers; `warnings` lists what the summary cannot measure (no held-out set).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass


@dataclass
class PromptSets:
    train: list[dict]  # {"prompt", "answer", "prompt_ids"}
    heldout: list[dict]
    stats: dict


def load_prompt_sets(cfg, tokenizer) -> PromptSets:
    """Rows from the synthetic task (debug mode) or from files, rendered and tokenized."""
    from transformers.utils import logging

    # a prompt longer than the model's limit is dropped and counted (data.max_prompt_tokens), so
    # transformers' "Token indices sequence length is longer than ..." warning says nothing new
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return _load(cfg, tokenizer)
    finally:
        logging.set_verbosity(verbosity)


def _load(cfg, tokenizer) -> PromptSets:
    stats: dict = {}
    if cfg.data.source == "synthetic":
        from system.data import synthetic

        train, heldout = synthetic.make_task(**dataclasses.asdict(cfg.data.synthetic))
        template = "plain"
    else:
        from system.data.datasets import filter_long, load_prompts

        train, stats = load_prompts(cfg.data.train_path, cfg.data.prompt_field, cfg.data.answer_field)
        template = cfg.data.template
        check_encodable(train, stats.pop("lines"), tokenizer, template, "data.train_path")
        heldout = []
        if cfg.data.eval_path:
            heldout, eval_stats = load_prompts(cfg.data.eval_path, cfg.data.prompt_field,
                                               cfg.data.answer_field)
            check_encodable(heldout, eval_stats.pop("lines"), tokenizer, template, "data.eval_path")
            stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
        train, stats["train_dropped_long"] = filter_long(train, tokenizer, template,
                                                         cfg.data.max_prompt_tokens)
        heldout, stats["eval_dropped_long"] = filter_long(heldout, tokenizer, template,
                                                          cfg.data.max_prompt_tokens)
        if not train:
            raise ValueError(f"data.train_path: no usable prompt in {cfg.data.train_path}")
    return PromptSets(_tokenize(train, tokenizer, template), _tokenize(heldout, tokenizer, template),
                      stats)


def check_encodable(rows: list[dict], lines: list[int], tokenizer, template: str, key: str) -> None:
    """ValueError naming the first row (by line) whose rendered prompt holds characters the
    tokenizer cannot encode, and those characters: characters it maps to its unknown token, or
    drops (the debug model's tokenizer drops what it does not know). Byte-level tokenizers (Qwen,
    Llama 3) encode everything and pass; whitespace and Unicode normalisation are not counted."""
    if not rows:
        return
    from system.data.datasets import render_prompt

    unk = tokenizer.unk_token_id
    texts = [render_prompt(tokenizer, r["prompt"], template) for r in rows]
    for start in range(0, len(texts), 1024):
        ids = tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=False)
        for i, (row_ids, back) in enumerate(zip(ids, decoded), start):
            lost = set(_norm(texts[i])) - set(_norm(back)) - set(" \t\r\n")
            if unk is not None and unk in row_ids:
                lost |= {c for c in texts[i] if unk in tokenizer(c, add_special_tokens=False)["input_ids"]}
            if lost:
                raise ValueError(f"{key}: line {lines[i]} ({texts[i][:40]!r}): the tokenizer cannot "
                                 f"encode {''.join(sorted(lost))!r}{_alphabet(tokenizer)}")


def _norm(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKC", text)


def _alphabet(tokenizer) -> str:
    """', it knows only '<characters>'' for a small character-level vocabulary (the debug model's)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > 256:
        return ""
    chars = "".join(sorted(t for t in vocab if len(t) == 1))
    return f"; it knows only {chars!r} (the debug model's task alphabet)" if chars else ""


def describe(cfg, prompts: PromptSets) -> str:
    """One console line: prompts kept, rows skipped by reason with their first line numbers, and
    prompts dropped as too long."""
    s = prompts.stats
    parts = [f"{len(prompts.train)} train prompts"]
    if cfg.data.source == "file":
        parts[0] += f" from {cfg.data.train_path}"
        for prefix, label in (("", "train"), ("eval_", "held-out")):
            reasons = s.get(f"{prefix}skip_reasons") or {}
            where = s.get(f"{prefix}skip_lines") or {}
            if reasons:
                parts.append(f"{label} rows skipped: " + "; ".join(
                    f"{n} {reason} (line {', '.join(map(str, where.get(reason, [])))}"
                    f"{', ...' if n > len(where.get(reason, [])) else ''})" for reason, n in reasons.items()))
            dropped = s.get(f"{prefix if prefix else 'train_'}dropped_long", 0)
            if dropped:
                parts.append(f"{dropped} {label} prompts over data.max_prompt_tokens={cfg.data.max_prompt_tokens} dropped")
    parts.append(f"{min(len(prompts.heldout), cfg.eval.size)} held-out prompts evaluated"
                 if prompts.heldout and cfg.eval.size else "no held-out evaluation")
    return ", ".join(parts)


def warnings(cfg, prompts: PromptSets) -> list[str]:
    """What the run will not measure, said at start (the summary then reports the train reward)."""
    if not prompts.heldout:
        return ["data.eval_path: not set, so there is no held-out set: the summary reports the train "
                "reward of the first and last steps (set data.eval_path to a held-out file)"]
    if cfg.eval.size == 0:
        return ["eval.size: 0, so nothing is evaluated: the summary reports the train reward of the "
                "first and last steps"]
    return []


def _tokenize(rows: list[dict], tokenizer, template: str) -> list[dict]:
    if template == "plain":
        texts = [r["prompt"] for r in rows]
    else:
        from system.data.datasets import render_prompt

        texts = [render_prompt(tokenizer, r["prompt"], template) for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [dict(r, prompt_ids=i) for r, i in zip(rows, ids)]


class PromptSampler:
    """Shuffled passes over the train rows; its state (epoch, position) is saved with checkpoints."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()
