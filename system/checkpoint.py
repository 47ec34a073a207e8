"""Checkpoint files: atomic writes, a `latest` pointer written last, and safe resume.

Layout under <run_dir>/checkpoints/:
    step_000004/            one checkpoint: learner/ (DeepSpeed's own files: model, optimizer,
                            scheduler, per rank), trainer_state.json (step, policy version, data
                            position, ...), manifest.json (every file with its size; written last)
    latest                  the name of the newest complete checkpoint; written after it
A checkpoint is written as `.tmp-step_000004/`, completed with its manifest, then renamed into
place, and only then is `latest` replaced (write + rename). A crash at any point leaves `latest`
naming a complete checkpoint. On resume, `latest` is followed; if what it names is missing or
damaged (a file missing or of the wrong size), older checkpoints are tried, newest first, with a
warning. The learners write into the same directory, so on a cluster it must be a shared volume.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

MANIFEST = "manifest.json"
STATE = "trainer_state.json"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(run_dir: str, step: int) -> str:
    """A fresh temporary directory for the checkpoint of `step`."""
    tmp = os.path.join(checkpoint_root(run_dir), f".tmp-{step_name(step)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def discard(tmp: str) -> None:
    """Remove a checkpoint that could not be completed (its space is freed for the next one)."""
    shutil.rmtree(tmp, ignore_errors=True)


def write_problem(tmp: str, err: BaseException) -> str:
    """What went wrong writing a checkpoint, in a few words: the cause (a Ray task error's own),
    and the free space left where it was being written."""
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    try:
        free = shutil.disk_usage(os.path.dirname(tmp)).free / 2**20
        where = f"; {free:.1f} MiB free on the volume of {os.path.dirname(tmp)}"
    except OSError:
        where = f"; {os.path.dirname(tmp)} cannot be read"
    return f"{type(err).__name__}: {text}{where}"


def _manifest(directory: str) -> dict:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                files[rel] = os.path.getsize(path)
    return files


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(run_dir: str, tmp: str, step: int, state: dict, keep: int) -> str:
    """Finish a checkpoint written into `tmp`: state, manifest, rename, then the latest pointer."""
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f, indent=2)
    _write_atomic(os.path.join(tmp, MANIFEST), json.dumps({"step": step, "files": _manifest(tmp)}))
    final = os.path.join(checkpoint_root(run_dir), step_name(step))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_latest(run_dir, step_name(step))
    _prune(run_dir, keep)
    return final


def write_latest(run_dir: str, name: str) -> None:
    _write_atomic(os.path.join(checkpoint_root(run_dir), "latest"), name + "\n")


def _prune(run_dir: str, keep: int) -> None:
    root = checkpoint_root(run_dir)
    complete = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    for name in complete[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def damage(directory: str) -> str | None:
    """Why a checkpoint directory cannot be loaded, or None if it is whole."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"no readable manifest ({err.__class__.__name__})"
    for rel, size in files.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"missing {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, expected {size}"
    return None


def find_resumable(run_dir: str) -> str | None:
    """The checkpoint to resume from: what `latest` names, else the newest whole one before it."""
    root = checkpoint_root(run_dir)
    try:
        with open(os.path.join(root, "latest")) as f:
            latest = f.read().strip()
    except OSError:
        return None
    candidates = [latest] + sorted((n for n in os.listdir(root)
                                    if n.startswith("step_") and n < latest), reverse=True)
    for name in candidates:
        problem = damage(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name)
        warnings.warn(f"checkpoint {name} skipped: {problem}", stacklevel=2)
    return None


def load_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE)) as f:
        return json.load(f)
