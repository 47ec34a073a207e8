"""Prompt sets for a run: the train and held-out rows, tokenized, and a resumable sampler."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class PromptSets:
    train: list[dict]  # {"prompt", "answer", "prompt_ids"}
    heldout: list[dict]
    stats: dict


def load_prompt_sets(cfg, tokenizer) -> PromptSets:
    """Rows from the synthetic task (debug mode) or from files, rendered and tokenized."""
    stats: dict = {}
    if cfg.data.source == "synthetic":
        from system.data import synthetic
        from system.debug_model import resolve_settings

        settings = resolve_settings(cfg.model.debug_settings)
        train, heldout = synthetic.make_task(settings["seed"], **settings["task"])
        template = "plain"
    else:
        from system.data.datasets import filter_long, load_prompts

        train, stats = load_prompts(cfg.data.train_path, cfg.data.prompt_field, cfg.data.answer_field)
        heldout = []
        if cfg.data.eval_path:
            heldout, eval_stats = load_prompts(cfg.data.eval_path, cfg.data.prompt_field,
                                               cfg.data.answer_field)
            stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
        template = cfg.data.template
        train, stats["train_dropped_long"] = filter_long(train, tokenizer, template,
                                                         cfg.data.max_prompt_tokens)
        heldout, stats["eval_dropped_long"] = filter_long(heldout, tokenizer, template,
                                                          cfg.data.max_prompt_tokens)
        if not train:
            raise ValueError(f"data.train_path: no usable prompt in {cfg.data.train_path}")
    return PromptSets(_tokenize(train, tokenizer, template), _tokenize(heldout, tokenizer, template),
                      stats)


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
