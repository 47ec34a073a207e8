"""Run outputs: metrics.jsonl, TensorBoard events, a compact console line per step, a summary."""

from __future__ import annotations

import json
import os
import time

CONSOLE_KEYS = (("reward_mean", "reward", ".3f"), ("accuracy", "acc", ".3f"),
                ("kl_full", "kl", ".4f"), ("kl_k3", "k3", ".4f"), ("clip_frac", "clip", ".3f"),
                ("entropy", "ent", ".3f"), ("response_len", "len", ".1f"),
                ("step_s", "s", ".1f"))


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._tb = self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("[logging] logging.wandb=true but wandb is not installed: skipping W&B "
                      "(pip install wandb)", flush=True)
            else:
                self._wandb = wandb.init(project=wandb_project, name=os.path.basename(run_dir),
                                         dir=run_dir, config=config, resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard is a dependency; keep running without it anyway
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so each step appears once."""
        self._file.close()
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    @staticmethod
    def console_line(step: int, steps: int, m: dict) -> str:
        parts = [f"step {step}/{steps}"]
        parts += [f"{short} {m[k]:{fmt}}" for k, short, fmt in CONSOLE_KEYS if k in m]
        return " | ".join(parts)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# How each learner statistic combines over the ranks of one optimizer step, and then over the steps
# of an update, so that what is logged is the same whatever the number of ranks:
#   share       each rank's share of the minibatch loss (the whole minibatch's normalizer): summed
#               over ranks, averaged over steps
#   token_mean  a mean over the rank's tokens: weighted by those tokens over ranks and steps (a mean
#               over every token of the update; behavior_logp_gap: of the first minibatch)
#   min, max    extremes over ranks and steps (ratio_min / ratio_max of the whole update)
#   global      already the whole minibatch's (the gradient norm after the ranks' reduction):
#               averaged over steps
LEARNER_REDUCTIONS = {
    "loss": "share", "pg_loss": "share",
    "kl": "token_mean", "kl_full": "token_mean", "kl_k3": "token_mean", "entropy": "token_mean",
    "clip_frac": "token_mean", "dual_clip_frac": "token_mean", "ratio_mean": "token_mean",
    "behavior_logp_gap": "token_mean",
    "ratio_min": "min", "ratio_max": "max",
    "grad_norm": "global",
    "tokens": "weight",  # the token_mean weights; not logged
}


def reduce_learner_steps(per_rank: list[list[dict]]) -> dict[str, float]:
    """One update's metrics from each rank's per-step statistics (per_rank[r][s] is a dict of
    floats, with `tokens`), combined as LEARNER_REDUCTIONS says; an unlisted key is an error."""
    steps = list(zip(*per_rank))  # steps[s] = the ranks' records of step s
    records = [r for step in steps for r in step]
    out = {}
    for key in {k for r in records for k in r}:
        rule = LEARNER_REDUCTIONS.get(key)
        if rule is None:
            raise KeyError(f"learner statistic {key!r} has no rule in LEARNER_REDUCTIONS")
        have = [r for r in records if key in r]
        if rule == "share":
            out[key] = sum(sum(r[key] for r in step) for step in steps) / len(steps)
        elif rule == "token_mean":
            out[key] = sum(r[key] * r["tokens"] for r in have) / max(sum(r["tokens"] for r in have), 1)
        elif rule in ("min", "max"):  # a rank without tokens reports a placeholder: leave it out
            values = [r[key] for r in have if r["tokens"] > 0] or [1.0]
            out[key] = min(values) if rule == "min" else max(values)
        elif rule == "global":
            out[key] = sum(step[0][key] for step in steps) / len(steps)
    out.pop("tokens", None)
    return out


def summary_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain-text table: (metric, start, end)."""
    head = ("metric", "start", "end")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line, fmt(head), line, *map(fmt, rows), line])
