"""A full disk while a checkpoint is written: the run stops with one line, the partial checkpoint
is removed, and the previous one stays whole and named by `latest`. The run's output_dir is a small
tmpfs of its own (mounting one needs root, as CI has; skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from system import checkpoint
from tests.faults.conftest import before_steps

pytestmark = pytest.mark.slow


@pytest.fixture
def small_volume(tmp_path):
    mount = tmp_path / "volume"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(volume, leave_bytes: int):
    """An action: fill the volume until only `leave_bytes` are free."""
    def action(trainer):
        free = shutil.disk_usage(volume).free
        with open(volume / "filler", "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - leave_bytes))
    return action


def test_a_full_disk_during_a_checkpoint_stops_the_run_and_keeps_the_previous_one(
        faults_run, monkeypatch, small_volume):
    before_steps(monkeypatch, {3: _fill(small_volume, 256 * 1024)})
    run = faults_run("full", f"output_dir={small_volume}", "trainer.steps=4", "checkpoint.every=1",
                     "checkpoint.keep=2")
    assert run.rc == 1
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint 3 could not be written" in lines[0], run.err
    assert "MiB free on the volume" in lines[0] and "trainer.resume=auto" in lines[0]
    root = checkpoint.checkpoint_root(str(small_volume / "full"))
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))  # the partial one is gone
    latest = checkpoint.find_resumable(str(small_volume / "full"))
    assert latest == os.path.join(root, "step_000002") and checkpoint.damage(latest) is None
    assert checkpoint.load_state(latest)["step"] == 2 and "step_000002" in lines[0]
