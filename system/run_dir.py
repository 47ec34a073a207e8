"""The run directory <output_dir>/<run_name>: one run's files, never mixed with another run's.

    run = claim(cfg)        # before Ray starts: ConfigError when this run may not use the directory
    run.begin(resolved)     # when the actors are ready: create it, clear stale files, save config.yaml

What claim() decides, from what the directory holds and trainer.resume:
- nothing there (or an empty directory): a new run;
- a run, and trainer.resume=none: refused, one line (continue it with trainer.resume=auto, pick a
  new run_name, or delete the directory): a rerun never appends to another run's files;
- a run with trainer.resume=auto (or a checkpoint path): the same run continued. Its metrics past
  the checkpoint are cut by the trainer on resume; with no checkpoint yet it starts again from step
  0 and its old metrics, TensorBoard events, summary and final policy are removed first;
- a finished run (summary.json for at least trainer.steps steps) with trainer.resume=auto:
  `complete`, nothing to do (`make run` twice in a row says so and exits 0).
Nothing is created before begin() (not even output_dir), so a run that fails before training
leaves no run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from system import checkpoint
from system.config import ConfigError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "final", "tensorboard")
STALE_ON_RESUME = ("summary.json", "final")  # rewritten at the end of the continued run
STALE_ON_RESTART = ("metrics.jsonl", "tensorboard", "summary.json", "final", "checkpoints")


@dataclass
class RunDir:
    path: str
    state: str  # new | resume | restart | complete
    summary: dict = field(default_factory=dict)  # summary.json of a complete run

    def begin(self, resolved_config: str) -> None:
        """Create the directory (or clear what the continued run rewrites) and save config.yaml."""
        for name in {"resume": STALE_ON_RESUME, "restart": STALE_ON_RESTART}.get(self.state, ()):
            target = os.path.join(self.path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "config.yaml"), "w") as f:
            f.write(resolved_config)

    def latest_checkpoint_step(self) -> int | None:
        path = checkpoint.find_resumable(self.path) if os.path.isdir(self.path) else None
        return checkpoint.load_state(path)["step"] if path else None


def _check_writable_dir(key: str, path: str) -> None:
    """ConfigError naming `key` unless `path` is a writable directory or can be created as one
    (it is created to find out, then removed again: begin() makes it for a run that starts)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a file, not a directory")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {path} is not writable")
        return
    missing, parent = [], path
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create {path} ({err.strerror or err})") from None
    for created in missing:  # deepest first
        os.rmdir(created)


def claim(cfg) -> RunDir:
    """What this run does with <output_dir>/<run_name> (see the module docstring)."""
    name = cfg.run_name
    if not name or name in (".", "..") or os.sep in name or "\0" in name:
        raise ConfigError(f"run_name: {name!r} must be a plain directory name (no '/', not '.' or '..')")
    out = os.path.abspath(cfg.output_dir)
    _check_writable_dir("output_dir", out)
    path = os.path.join(out, name)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"run_name: {path} is a file, not a run directory")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if not held:
        return RunDir(path, "new")
    if cfg.trainer.resume == "none":
        raise ConfigError(
            f"run_name: {path} already holds a run ({', '.join(held)}); continue it with "
            f"trainer.resume=auto, pick a new run_name=..., or delete the directory")
    summary = _summary(path)
    if cfg.trainer.resume == "auto" and summary.get("steps", -1) >= cfg.trainer.steps:
        return RunDir(path, "complete", summary)
    if cfg.trainer.resume == "auto" and checkpoint.find_resumable(path) is None:
        return RunDir(path, "restart")
    return RunDir(path, "resume")


def _summary(path: str) -> dict:
    try:
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
        return summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        return {}
