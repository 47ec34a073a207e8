"""Checkpoint file logic: atomic commit, latest pointer, damaged checkpoints skipped."""

from __future__ import annotations

import os

import pytest

from system import checkpoint


def _save(run_dir, step, payload=b"x" * 100, keep=5):
    tmp = checkpoint.begin(str(run_dir), step)
    os.makedirs(os.path.join(tmp, "learner"))
    with open(os.path.join(tmp, "learner", "model.pt"), "wb") as f:
        f.write(payload)
    return checkpoint.commit(str(run_dir), tmp, step, {"step": step}, keep)


def test_latest_points_to_newest_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_000004", "step_000006"]
    assert checkpoint.find_resumable(str(tmp_path)) == str(root / "step_000006")
    assert checkpoint.load_state(str(root / "step_000006")) == {"step": 6}
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_damaged_latest_falls_back_to_previous_with_warning(tmp_path):
    _save(tmp_path, 2)
    latest = _save(tmp_path, 4)
    with open(os.path.join(latest, "learner", "model.pt"), "wb") as f:
        f.write(b"xx")  # truncated
    with pytest.warns(UserWarning, match="step_000004 skipped: learner/model.pt has 2 bytes"):
        found = checkpoint.find_resumable(str(tmp_path))
    assert found.endswith("step_000002")


def test_unpointed_newer_checkpoint_is_ignored_and_partial_tmp_never_loaded(tmp_path):
    _save(tmp_path, 2)
    checkpoint.begin(str(tmp_path), 4)  # a crash while writing: only the temporary dir exists
    assert checkpoint.find_resumable(str(tmp_path)).endswith("step_000002")
    assert checkpoint.find_resumable(str(tmp_path / "nothing")) is None


def test_missing_manifest_is_damage(tmp_path):
    path = _save(tmp_path, 2)
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    assert "manifest" in checkpoint.damage(path)
    with pytest.warns(UserWarning):
        assert checkpoint.find_resumable(str(tmp_path)) is None
