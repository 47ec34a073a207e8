"""deploy/ray (runtime env, submit.sh) and deploy/docker agree with the repo and with Ray.

The runtime env is read by Ray's own parser and its excludes applied with Ray's own directory walk,
so "outputs/ is not uploaded" is checked the way `ray job submit` decides it. submit.sh runs with a
stand-in `ray` on PATH that records its arguments, so the command line it builds is checked without
a cluster (tests/integration/test_job_submit.py submits for real).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from system.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = ROOT / "deploy" / "ray" / "runtime_env.yaml"
SUBMIT = ROOT / "deploy" / "ray" / "submit.sh"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
UPLOAD_LIMIT_MB = 100  # Ray refuses a working_dir over ~500 MiB; ours should be a few MiB of code


def _runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def _ray_walk(root: Path, excludes: list, include_gitignore: bool) -> list:
    """The files `ray job submit --working-dir root` would upload, by Ray's own walk and matcher."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    files = []
    packaging._dir_travel(
        root, [packaging._get_excludes(root, excludes)],
        lambda p: files.append(p) if p.is_file() else None,
        include_gitignore=include_gitignore,
    )
    return files


def test_runtime_env_is_what_ray_job_submit_parses():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    assert set(env) == {"working_dir", "excludes", "env_vars"}  # no pip/conda: the image has them
    RuntimeEnv(**env)  # type-checks env_vars (strings only) and the rest
    parsed = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    assert parsed["working_dir"] == "." and parsed["excludes"] == env["excludes"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_runtime_env_does_not_clash_with_the_drivers_ray_init(monkeypatch):
    """Ray refuses a job whose driver calls ray.init(runtime_env=...) naming a field or env var
    that the job's runtime env also names; run system.train's init_ray as a job would and compare."""
    import ray

    from system import train

    job_env = _runtime_env()
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # set by the job supervisor
    for key, value in job_env["env_vars"].items():
        monkeypatch.setenv(key, value)  # the driver sees the job's env vars
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append(kwargs))
    train.init_ray(load_config(str(ROOT / "configs/debug.yaml")))
    driver_env = calls[0].get("runtime_env") or {}
    assert not set(driver_env.get("env_vars", {})) & set(job_env["env_vars"])
    assert not (set(driver_env) - {"env_vars"}) & set(job_env)


def test_runtime_env_excludes_outputs_caches_and_venv(tmp_path):
    excludes = _runtime_env()["excludes"]
    for entry in ("outputs/", ".cache/", ".venv/"):
        assert entry in excludes
    kept = ["system/train.py", "configs/debug.yaml", "deploy/ray/runtime_env.yaml", "docs/design.md"]
    dropped = ["outputs/run/metrics.jsonl", ".cache/debug_model/model.safetensors", ".venv/bin/python",
               ".git/HEAD", "system/__pycache__/train.cpython-311.pyc", "wandb/run/log.txt",
               "docs/loss.png", ".pytest_cache/v/cache"]
    for rel in kept + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    # no .gitignore in tmp_path: the excludes alone must keep these out
    uploaded = {p.relative_to(tmp_path).as_posix() for p in _ray_walk(tmp_path, excludes, False)}
    assert uploaded == set(kept)


def test_repo_upload_stays_small():
    files = _ray_walk(ROOT, _runtime_env()["excludes"], include_gitignore=True)
    total_mb = sum(p.stat().st_size for p in files) / 2**20
    assert total_mb < UPLOAD_LIMIT_MB, f"working_dir upload would be {total_mb:.0f} MiB"
    assert not any(".venv" in p.parts or "outputs" in p.parts for p in files)


AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _submit_env(tmp_path: Path, env_extra=None) -> dict:
    """The caller's environment without Ray's address and auth settings, HOME an empty folder (no
    ~/.ray/auth_token), then env_extra."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *AUTH_VARS)}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.update(env_extra or {})
    return env


def _run_submit(tmp_path: Path, *args: str, env_extra=None, with_argv_env=False):
    """Run submit.sh from tmp_path with a stand-in `ray` that records its argv, working directory
    and auth env; check it ran in the repo root (what `--working-dir .` uploads); return the argv
    (and the auth env it saw when with_argv_env). A token is set unless env_extra says otherwise."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"env = {{k: os.environ.get(k) for k in {AUTH_VARS!r}}}\n"
                    f"json.dump([os.getcwd(), env] + sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = _submit_env(tmp_path, {"RAY_AUTH_TOKEN": "t0ken", **(env_extra or {})})
    env["PATH"] = f"{fake.parent}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(["bash", str(SUBMIT), *args], check=True, env=env, cwd=tmp_path, timeout=60)
    cwd, auth_env, *argv = json.loads(record.read_text())
    assert Path(cwd).resolve() == ROOT
    return (argv, auth_env) if with_argv_env else argv


def _check_train_command(entrypoint: list) -> None:
    assert entrypoint[:3] == ["python", "-m", "system.train"], entrypoint
    assert (ROOT / "system" / "train.py").is_file()
    assert entrypoint[3] == "--config"
    load_config(str(ROOT / entrypoint[4]), entrypoint[5:])


def test_submit_script_defaults(tmp_path):
    argv = _run_submit(tmp_path)
    split = argv.index("--")
    options, entrypoint = argv[:split], argv[split + 1:]
    assert options == ["job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                       "--runtime-env", "deploy/ray/runtime_env.yaml"]
    assert entrypoint == ["python", "-m", "system.train", "--config", "configs/qwen2.5-0.5b-gsm8k.yaml"]
    _check_train_command(entrypoint)


def test_submit_script_passes_config_and_overrides(tmp_path):
    argv = _run_submit(tmp_path, "configs/qwen2.5-1.5b-math.yaml", "trainer.steps=3", "output_dir=/outputs")
    entrypoint = argv[argv.index("--") + 1:]
    assert entrypoint[4:] == ["configs/qwen2.5-1.5b-math.yaml", "trainer.steps=3", "output_dir=/outputs"]
    _check_train_command(entrypoint)


def test_submit_script_takes_the_address_from_ray_address(tmp_path):
    argv = _run_submit(tmp_path, env_extra={"RAY_ADDRESS": "http://head.example:8265"})
    assert argv[argv.index("--address") + 1] == "http://head.example:8265"


def test_submit_script_sends_the_token_in_token_mode(tmp_path):
    """Ray's CLI attaches the token only when RAY_AUTH_MODE=token; submit.sh sets it by default."""
    _, env = _run_submit(tmp_path, with_argv_env=True)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "t0ken"
    token_file = tmp_path / "home" / ".ray" / "auth_token"  # the file a local ray.init writes
    token_file.parent.mkdir(parents=True)
    token_file.write_text("from-file")
    _, env = _run_submit(tmp_path, with_argv_env=True, env_extra={"RAY_AUTH_TOKEN": ""})
    assert env["RAY_AUTH_MODE"] == "token"


def test_submit_script_without_a_token_stops_with_one_line(tmp_path):
    fake = tmp_path / "bin" / "ray"  # must not be reached
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho called > {tmp_path / 'called'}\n")
    fake.chmod(0o755)
    env = _submit_env(tmp_path)
    env["PATH"] = f"{fake.parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(["bash", str(SUBMIT)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "RAY_AUTH_TOKEN" in done.stderr
    assert not (tmp_path / "called").exists()


def test_submit_script_leaves_an_explicit_disabled_mode(tmp_path):
    _, env = _run_submit(tmp_path, with_argv_env=True,
                         env_extra={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""})
    assert env["RAY_AUTH_MODE"] == "disabled"


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"ARG {name}= not in {DOCKERFILE}"
    return match.group(1)


def test_image_ray_version_matches_the_manifests():
    ray_version = _dockerfile_arg("RAY_VERSION")
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert cluster["rayVersion"] == ray_version, name


def test_image_torch_matches_the_gpu_extra_pin():
    """vllm pins torch exactly; the image installs that torch before the project."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"vllm==0.32.0"' in pyproject, "gpu extra changed: re-check the torch pin vllm needs"
    assert _dockerfile_arg("TORCH_VERSION") == "2.13.0"


def test_dockerfile_copies_only_files_that_exist():
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                if src != ".":
                    assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
