"""`ray job submit` end to end: a local Ray head on 127.0.0.1, the repo uploaded as the working dir.

    pytest tests/integration/test_job_submit.py -m slow

Steps: (1) start a head with `ray start --head` on free ports, in a temp dir of its own and a
session of its own, with Ray's token authentication on and a token of its own; (2) submit with the
same flags and auth settings as deploy/ray/submit.sh plus --no-wait; (3) poll the job through Ray's
JobSubmissionClient (with the token) until it ends, print its logs if it failed; (4) stop the head
by killing that session's processes.

Teardown does not call `ray stop --force`: it kills every Ray process on the machine, including
other users' and other tests' clusters. Every process of our head shares the session started for
`ray start` (Ray does not setsid its daemons), so we end exactly those, plus their descendants.

test_submission_without_the_token_is_refused checks that the head refuses a submission with no
token or a wrong one; test_trivial_job_succeeds checks the deploy path alone with the token (upload,
runtime env, entrypoint, status); test_debug_training_job_succeeds runs two training steps of
configs/debug.yaml through it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from tests.integration.conftest import session_processes, stop_session

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, and the `python` jobs run
SOCKET_PATH_MAX = 107  # AF_UNIX path limit on Linux (108 bytes with the NUL)
# <temp>/session_2026-01-01_00-00-00_000000_12345/sockets/plasma_store: the longest socket Ray makes
SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")
JOB_TIMEOUT_S = 480
# the job's size, as TEST_OVERRIDES (tests/integration/conftest.py) in words without spaces:
# `ray job submit` joins the entrypoint's words with spaces
JOB_SIZE = ["model.debug_settings.warm_start.steps=30", "trainer.prompts_per_step=8",
            "rollout.group_size=4", "learner.minibatches=1", "trainer.progress_bar=false"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    found = BIN / "ray" if (BIN / "ray").is_file() else shutil.which("ray")
    if not found:
        pytest.skip("the `ray` command line is not installed beside this python")
    return str(found)


AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _ray_env(token: str = "") -> dict:
    """Environment for the head and the CLI: this venv's python first on PATH (jobs run `python`),
    no RAY_ADDRESS from the caller, no usage-stats prompt; with a token, token auth on with it (as
    deploy/ray/submit.sh sets it), else no auth settings at all. The token is passed explicitly, so
    the result does not depend on ~/.ray/auth_token (any earlier local ray.init() writes one)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *AUTH_VARS):
        env.pop(key, None)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _temp_dir(tmp_path: Path) -> tuple:
    """(temp dir for Ray, whether we made it outside tmp_path): under tmp_path when the socket
    paths Ray makes there stay under the AF_UNIX limit, else a short one in /tmp."""
    candidate = tmp_path / "ray"
    if len(str(candidate)) + SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        candidate.mkdir()
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="rayjt-", dir="/tmp")), True


class RayHead:
    """A Ray head started with `ray start --head` on 127.0.0.1, in a session of its own."""

    def __init__(self, tmp_path: Path):
        self.cli = _ray_cli()
        self.token = secrets.token_hex(16)
        self.env = _ray_env(self.token)
        self.temp_dir, self._own_temp = _temp_dir(tmp_path)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.sid = None

    def start(self) -> None:
        cmd = [self.cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--num-cpus", "4", "--include-dashboard", "true", "--temp-dir", str(self.temp_dir),
               # fixed defaults (10001, 52365) would clash with another head on this machine
               "--ray-client-server-port", str(_free_port()),
               "--dashboard-agent-listen-port", str(_free_port()),
               "--disable-usage-stats"]
        # start_new_session: `ray start` becomes a session leader; its daemons inherit the session id
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sid = proc.pid
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}")
        self.client = self._connect()

    def _connect(self, timeout_s: float = 90):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # the header explicitly: this process's own auth mode depends on earlier tests
                return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})
            except Exception:  # the job server comes up a little after `ray start` returns
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def try_submit(self, *entrypoint: str, env=None) -> tuple:
        """`ray job submit` like deploy/ray/submit.sh, with --no-wait and `env` (default: with the
        token); return (submission id, the finished process)."""
        submission_id = f"jobtest-{uuid.uuid4().hex[:8]}"
        cmd = [self.cli, "job", "submit", "--address", self.address, "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env", "deploy/ray/runtime_env.yaml", "--no-wait",
               "--", *entrypoint]
        done = subprocess.run(cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                              timeout=180)
        return submission_id, done

    def submit(self, *entrypoint: str) -> str:
        """Submit with the token; return the submission id."""
        submission_id, done = self.try_submit(*entrypoint)
        assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"
        return submission_id

    def wait(self, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
        """Poll until the job ends; return its final status, printing its logs unless SUCCEEDED."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout_s
        status = self.client.get_job_status(submission_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = self.client.get_job_status(submission_id)
        if not status.is_terminal():
            self.client.stop_job(submission_id)
        if status != JobStatus.SUCCEEDED:
            info = self.client.get_job_info(submission_id)
            print(f"job {submission_id}: {status} ({info.message})\n--- ray job logs ---\n"
                  f"{self.client.get_job_logs(submission_id)}")
        return status.value

    def stop(self) -> None:
        if self.sid is not None:
            stop_session(self.sid)
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("head"))
    try:
        head.start()
        yield head
    finally:
        head.stop()  # also when start() or a test failed


@pytest.mark.timeout(300)
def test_ray_head_starts_and_stops_cleanly(tmp_path):
    """A head starts on 127.0.0.1 and, after stop(), none of its processes remain.
    (First in the file, so it runs before the shared head below exists.)"""
    head = RayHead(tmp_path)
    try:
        head.start()
        assert session_processes(head.sid), "ray start left no processes in its session"
    finally:
        head.stop()
    assert session_processes(head.sid) == []


@pytest.mark.timeout(300)
def test_submission_without_the_token_is_refused(ray_head, tmp_path):
    """Token auth is on: `ray job submit` with no token (no RAY_AUTH_*, a HOME without
    ~/.ray/auth_token) gets 401, a submission with a wrong token 403 (straight to the REST endpoint
    the CLI posts to: a second CLI start costs ~10 s here), and neither leaves a job behind."""
    import requests

    (tmp_path / "home").mkdir()
    submission_id, done = ray_head.try_submit("python", "-c", "print('ran')",
                                              env={**_ray_env(), "HOME": str(tmp_path / "home")})
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Missing authentication token" in output, output
    wrong = requests.post(f"{ray_head.address}/api/jobs/", timeout=30,
                          json={"entrypoint": "echo ran", "submission_id": "jobtest-wrong-token"},
                          headers={"Authorization": f"Bearer {secrets.token_hex(16)}"})
    assert wrong.status_code == 403 and "Invalid authentication token" in wrong.text
    jobs = {job.submission_id for job in ray_head.client.list_jobs()}
    assert not jobs & {submission_id, "jobtest-wrong-token"}


@pytest.mark.timeout(600)
def test_trivial_job_succeeds(ray_head):
    """The deploy path alone: upload (without the excluded dirs), runtime env, `python`, status."""
    probe = ("import json, os, system; print('PROBE ' + json.dumps({"
             "'unbuffered': os.environ.get('PYTHONUNBUFFERED'),"
             "'entries': sorted(os.listdir('.'))}))")
    submission_id = ray_head.submit("python", "-c", probe)
    assert ray_head.wait(submission_id, timeout_s=180) == "SUCCEEDED"

    line = next(l for l in ray_head.client.get_job_logs(submission_id).splitlines() if l.startswith("PROBE "))
    report = json.loads(line[len("PROBE "):])
    assert report["unbuffered"] == "1"  # env_vars from deploy/ray/runtime_env.yaml
    assert {"system", "workers", "configs", "deploy"} <= set(report["entries"])  # the repo arrived
    assert not {".venv", "outputs", ".cache", ".git"} & set(report["entries"])  # excludes held


@pytest.mark.timeout(300)
def test_relative_output_dir_stops_the_job_at_start(ray_head):
    """Without output_dir the run would write into Ray's copy of the working dir (deleted with the
    session): the driver stops at once, with one line that says what to pass."""
    submission_id = ray_head.submit("python", "-m", "system.train", "--config", "configs/debug.yaml")
    assert ray_head.wait(submission_id, timeout_s=240) == "FAILED"
    logs = ray_head.client.get_job_logs(submission_id)
    errors = [l for l in logs.splitlines() if l.startswith("config error:")]
    assert len(errors) == 1 and errors[0].startswith("config error: output_dir: 'outputs' is /"), errors
    assert "runtime_resources/working_dir_files" in errors[0] and "absolute path on shared storage" in errors[0]


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_debug_training_job_succeeds(ray_head, tmp_path):
    """Two training steps of configs/debug.yaml submitted as a Ray job. output_dir is absolute:
    the job runs in Ray's copy of the working dir, which is deleted with the session."""
    out = tmp_path / "outputs"
    submission_id = ray_head.submit(
        "python", "-m", "system.train", "--config", "configs/debug.yaml", "trainer.steps=2", "eval.size=16",
        f"output_dir={out}", "run_name=jobtest", *JOB_SIZE,
        # the repo's cached debug model: the working-dir copy has no .cache/ (excluded)
        f"model.debug_cache={ROOT / '.cache' / 'debug_model'}")
    assert ray_head.wait(submission_id) == "SUCCEEDED"
    metrics = out / "jobtest" / "metrics.jsonl"
    assert metrics.is_file()
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # one "train" record per step (the file also holds the "eval" records at the start and end)
    assert [r["step"] for r in records if r.get("kind") == "train"] == [1, 2]
