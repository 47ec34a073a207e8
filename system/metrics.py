"""Run outputs: metrics.jsonl, TensorBoard events, a compact console line per step, the progress
bar (with every console line printed above it), a summary."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout

CONSOLE_KEYS = (("reward_mean", "reward", ".3f"), ("accuracy", "acc", ".3f"),
                ("kl_full", "kl", ".4f"), ("kl_seq", "kl_seq", ".3f"), ("kl_k3", "k3", ".4f"),
                ("clip_frac", "clip", ".3f"),
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
#   seq_mean    a mean over the rank's responses (kl_seq): weighted by those responses likewise
#   min, max    extremes over ranks and steps (ratio_min / ratio_max of the whole update)
#   global      already the whole minibatch's (the gradient norm after the ranks' reduction):
#               averaged over steps
LEARNER_REDUCTIONS = {
    "loss": "share", "pg_loss": "share",
    "kl": "token_mean", "kl_full": "token_mean", "kl_k3": "token_mean", "entropy": "token_mean",
    "clip_frac": "token_mean", "dual_clip_frac": "token_mean", "ratio_mean": "token_mean",
    "behavior_logp_gap": "token_mean",
    "mismatch_logratio_mean": "token_mean", "mismatch_kl": "token_mean", "corrected_frac": "token_mean",
    "kl_to_go": "token_mean", "kl_seq": "seq_mean",
    "ratio_min": "min", "ratio_max": "max", "mismatch_logratio_max": "max", "prefix_ratio_max": "max",
    "grad_norm": "global",
    "tokens": "weight",  # the token_mean weights; not logged
    "sequences": "weight",  # the seq_mean weights; not logged
}
WEIGHTS = {"token_mean": "tokens", "seq_mean": "sequences"}


def combine_pieces(records: list[dict]) -> dict[str, float]:
    """One rank's statistics of one optimizer step from those of its micro-batches, which are
    pieces of the step as the ranks are (LEARNER_REDUCTIONS): shares summed, means weighted by
    their tokens or responses, extremes over the pieces with tokens; `tokens` and `sequences`
    summed, for the reduction over ranks that follows."""
    return _reduce([records])


def reduce_learner_steps(per_rank: list[list[dict]]) -> dict[str, float]:
    """One update's metrics from each rank's per-step statistics (per_rank[r][s] is a dict of
    floats, with `tokens`), combined as LEARNER_REDUCTIONS says; an unlisted key is an error."""
    out = _reduce(list(zip(*per_rank)))  # steps[s] = the ranks' records of step s
    out.pop("tokens", None)
    out.pop("sequences", None)
    return out


def _reduce(steps: list) -> dict[str, float]:
    """steps[s]: the parts (ranks, or one rank's micro-batches) of step s. Shares and weights are
    summed over a step's parts and averaged over the steps; means are weighted; extremes are
    taken over the parts with tokens (a part without reports a placeholder)."""
    records = [r for step in steps for r in step]
    out = {}
    for key in {k for r in records for k in r}:
        rule = LEARNER_REDUCTIONS.get(key)
        if rule is None:
            raise KeyError(f"learner statistic {key!r} has no rule in LEARNER_REDUCTIONS")
        have = [r for r in records if key in r]
        if rule in ("share", "weight"):
            out[key] = sum(sum(r[key] for r in step if key in r) for step in steps) / len(steps)
        elif rule in WEIGHTS:
            w = WEIGHTS[rule]
            out[key] = sum(r[key] * r[w] for r in have) / max(sum(r[w] for r in have), 1)
        elif rule in ("min", "max"):
            values = [r[key] for r in have if r["tokens"] > 0] or [1.0]
            out[key] = min(values) if rule == "min" else max(values)
        else:  # global: the same in every part of a step
            out[key] = sum(step[0][key] for step in steps) / len(steps)
    return out


def summary_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain-text table: (metric, start, end)."""
    head = ("metric", "start", "end")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line, fmt(head), line, *map(fmt, rows), line])


class _AboveTheBar:
    """Stands in for stdout or stderr while the progress bar is shown: each complete line goes out
    through tqdm.write, which clears the bar, writes the line and redraws the bar under it. A plain
    print would land on the bar's row, after its text (`train: 96%|...|step 78/80 | reward ...`)."""

    def __init__(self, stream):
        self.stream, self._partial, self._lock = stream, "", threading.Lock()

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with self._lock:  # Ray forwards actor output from a thread of its own
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:  # a line without its newline yet stays until the newline comes
        self.stream.flush()

    def finish(self) -> None:
        if self._partial:
            self.write("\n")

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


@contextmanager
def progress_bar(total: int, enabled: bool = True):
    """A tqdm bar over the training steps on stderr, shown on a terminal only (a job log gets the
    per-step lines alone, not a carriage-return update per step). While it is shown, whatever is
    printed to stdout or stderr (step lines, evals, checkpoints, actor output) goes above it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="train", file=sys.stderr, disable=None if enabled else True)
    if bar.disable:
        try:
            yield bar
        finally:
            bar.close()
        return
    out, err = _AboveTheBar(sys.stdout), _AboveTheBar(sys.stderr)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            yield bar
    finally:
        out.finish()
        err.finish()
        bar.close()


class Phases:
    """Seconds per phase of one step (or of start-up), in the order the phases first ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """e.g. `ray.init 6.1s, learner build 3.0s`."""
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items())
