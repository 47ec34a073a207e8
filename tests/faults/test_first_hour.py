"""A user's first hour (issue 22): runs never mix, the debug tokenizer refuses what it cannot
encode, attaching to a cluster has a deadline, a local cluster listens on 127.0.0.1 only, and the
exit contract holds (0 done, 1 a failure during training, 2 bad input, 130 Ctrl-C).

All but the socket test run before Ray would start (ray.init is replaced by a failure, so a test
that reached it fails instead of starting a cluster)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.faults.test_rewards_and_data import debug_model_dir

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")
GOOD = [{"question": "1+2-3=", "answer": "0"}, {"question": "4+5-1=", "answer": "8"}]


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the run should have stopped before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)


def _data(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path, data, *extra) -> list[str]:
    return ["--config", DEBUG, f"output_dir={tmp_path / 'out'}", f"model.path={debug_model_dir()}",
            "data.source=file", f"data.train_path={data}", "data.prompt_field=question", *extra]


def _errors(stderr: str) -> list[str]:
    """stderr less the documented warning lines."""
    return [x for x in stderr.strip().splitlines()
            if x and not x.startswith(("config warning: ", "data warning: "))]


def _main(capsys, argv) -> tuple[int, str, list[str]]:
    from system.train import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, _errors(out.err)


# ---- 1. every run its own directory -------------------------------------------------------------

def test_rerun_of_an_existing_run_name_is_refused_and_appends_nothing(tmp_path, capsys, no_ray):
    run = tmp_path / "out" / "debug"
    run.mkdir(parents=True)
    old = '{"kind": "train", "step": 1, "reward_mean": 0.5}\n'
    (run / "metrics.jsonl").write_text(old)
    rc, out, err = _main(capsys, _args(tmp_path, _data(tmp_path / "t.jsonl", GOOD)))
    assert rc == 2 and err == [
        f"config error: run_name: {run} already holds a run (metrics.jsonl); continue it with "
        f"trainer.resume=auto, pick a new run_name=..., or delete the directory"], err
    assert (run / "metrics.jsonl").read_text() == old and sorted(os.listdir(run)) == ["metrics.jsonl"]


def test_a_run_that_fails_before_training_leaves_no_run_directory(tmp_path, capsys, no_ray):
    rc, _, err = _main(capsys, _args(tmp_path, tmp_path / "missing.jsonl"))
    assert rc == 2 and len(err) == 1 and "missing.jsonl" in err[0]
    assert not (tmp_path / "out").exists()  # nor its output_dir


def test_resume_auto_of_a_finished_run_says_it_is_complete(tmp_path, capsys, no_ray):
    run = tmp_path / "out" / "debug"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 3, "start": {}, "end": {}}))
    rc, out, err = _main(capsys, _args(tmp_path, _data(tmp_path / "t.jsonl", GOOD),
                                       "trainer.steps=3", "trainer.resume=auto"))
    assert rc == 0 and err == [] and f"[run] debug is complete (3 steps; summary in {run}/summary.json)" in out


def test_resume_auto_without_a_checkpoint_starts_the_run_again_with_clean_files(tmp_path):
    from system.config import load_config
    from system.run_dir import claim

    cfg = load_config(DEBUG, [f"output_dir={tmp_path}", "trainer.resume=auto"])
    run = tmp_path / "debug"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    claimed = claim(cfg)
    assert claimed.state == "restart"
    claimed.begin("run_name: debug\n")
    assert sorted(os.listdir(run)) == ["config.yaml"]


# ---- 2. the debug tokenizer and the held-out set ------------------------------------------------

def test_debug_tokenizer_refuses_characters_it_cannot_encode(tmp_path, capsys, no_ray):
    data = _data(tmp_path / "t.jsonl", [GOOD[0], {"question": "What is 3+4?", "answer": "7"}])
    rc, _, err = _main(capsys, _args(tmp_path, data))
    assert rc == 2 and err == [
        "config error: data.train_path: line 2 ('What is 3+4?'): the tokenizer cannot encode "
        "'?Wahist'; it knows only '*+-0123456789=' (the debug model's task alphabet)"], err


def test_no_held_out_set_is_a_warning_at_start_and_the_summary_says_what_it_measured(
        tmp_path, capsys, monkeypatch):
    import system.train

    monkeypatch.setattr(system.train, "train", lambda *args, **kwargs: 0)  # where Ray would start
    from system.train import main

    capsys.readouterr()
    assert main(_args(tmp_path, _data(tmp_path / "t.jsonl", GOOD))) == 0
    err = capsys.readouterr().err
    assert "data warning: data.eval_path: not set, so there is no held-out set" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "reward_mean": r,
                                                           "accuracy": r}) + "\n"
                                               for s, r in ((1, 0.25), (2, 0.5))))
    cfg = system.train.load_config(DEBUG, ["run_name=run"])
    text = system.train.summary_text(cfg, str(run), {"start": {}, "end": {}, "seconds": 3.0})
    assert "no held-out set: train reward of step 1 (start) and step 2 (end)" in text
    assert "reward_mean | 0.250 | 0.500" in text and "held-out set of" not in text


def test_the_example_dataset_trains_the_debug_model(tmp_path):
    """configs/data/arith_*.jsonl, as the README's own-data command reads them."""
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import describe, load_prompt_sets

    cfg = load_config(DEBUG, ["data.source=file", "data.train_path=configs/data/arith_train.jsonl",
                              "data.eval_path=configs/data/arith_eval.jsonl", "data.prompt_field=question"])
    prompts = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(debug_model_dir()))
    assert (len(prompts.train), len(prompts.heldout)) == (512, 128)
    assert describe(cfg, prompts) == ("512 train prompts from configs/data/arith_train.jsonl, "
                                      "128 held-out prompts evaluated")


def test_building_the_debug_model_prints_no_deepspeed_notice(tmp_path):
    """The first run on a new machine builds the debug model; saving it imports DeepSpeed
    (transformers -> accelerate), whose accelerator notice the driver is told to skip, as its learners
    are. A new process with a new cache and none of that environment, stopped by its missing data
    before Ray starts."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-m", "system.train", "--config", DEBUG, f"output_dir={tmp_path / 'out'}",
         f"model.debug_cache={tmp_path / 'cache'}", "model.debug_settings={warm_start: {steps: 2}}",
         "data.source=file", f"data.train_path={tmp_path / 'missing.jsonl'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "[debug_model] ready" in proc.stdout, proc.stdout + proc.stderr
    assert "accelerator" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == 2 and _errors(proc.stderr) == [
        f"config error: data: prompt dataset {tmp_path / 'missing.jsonl'}: no such file or directory"]


# ---- 3. attaching to a cluster has a deadline ---------------------------------------------------

@pytest.mark.parametrize("found_by", ["RAY_ADDRESS", "stale record"])
def test_an_unreachable_cluster_stops_the_run_within_the_deadline_with_one_line(tmp_path, found_by):
    """RAY_ADDRESS naming a cluster that is gone, or the record a `ray start` left behind (in a
    Ray temp dir of the test's own, RAY_TMPDIR, not the machine's)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(tmp_path / "rt"))
    source = "RAY_ADDRESS"
    if found_by == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    else:
        (tmp_path / "rt" / "ray").mkdir(parents=True)
        (tmp_path / "rt" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        source = "recorded in ray_current_cluster by `ray start` on this machine"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "system.train",
                           *_args(tmp_path, _data(tmp_path / "t.jsonl", GOOD))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _errors(proc.stderr) == [
        f"config error: ray.address: no Ray cluster answers at 127.0.0.1:{port} ({source}) within "
        f"30s (Connection refused): if that cluster is gone, run `ray stop` (and unset RAY_ADDRESS); "
        f"to start a local cluster instead, pass ray.address=local"], proc.stderr
    assert time.monotonic() - t0 < 90


# ---- 4. a local cluster listens on loopback only -------------------------------------------------

_LIST_SOCKETS = textwrap.dedent("""
    import json, os, sys
    import psutil, ray
    from system.config import load_config
    from system.train import init_ray

    init_ray(load_config(sys.argv[1], ["ray.address=local", "ray.log_to_driver=false"]))

    @ray.remote
    def pid():
        return os.getpid()

    ray.get(pid.remote())  # a worker process too
    sid = os.getsid(0)
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getsid(proc.pid) != sid:
                continue
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append([proc.info["name"], c.laddr.ip, c.laddr.port])
        except (OSError, psutil.Error):
            continue
    ray.shutdown()
    print("SOCKETS " + json.dumps(found))
""")


@pytest.mark.slow
def test_the_drivers_local_cluster_listens_on_loopback_only(tmp_path):
    """What `python -m system.train` starts when there is no cluster: every listening socket of
    every process of that cluster (GCS, raylet, agents, workers) on 127.0.0.1."""
    script = tmp_path / "list_sockets.py"
    script.write_text(_LIST_SOCKETS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # as a user's shell
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(script), DEBUG], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, start_new_session=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SOCKETS ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    sockets = json.loads(line[len("SOCKETS "):])
    names = {name for name, _, _ in sockets}
    assert "gcs_server" in names and "raylet" in names, sockets
    outside = [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"listening beyond loopback: {outside}"


# ---- 5. the exit contract -----------------------------------------------------------------------

def test_bad_output_dir_no_arguments_and_help(tmp_path, capsys, no_ray):
    from system.train import main

    rc, out, err = _main(capsys, _args(tmp_path, "x.jsonl", "output_dir=/proc/nope"))
    assert rc == 2 and err == ["config error: output_dir: cannot create /proc/nope (No such file or directory)"]
    assert out == ""  # no config dump before (or instead of) the error
    (tmp_path / "afile").write_text("")
    rc, _, err = _main(capsys, _args(tmp_path, "x.jsonl", f"output_dir={tmp_path / 'afile'}"))
    assert rc == 2 and err == [f"config error: output_dir: {tmp_path / 'afile'} is a file, not a directory"]
    rc, _, err = _main(capsys, [])
    assert rc == 2 and err == ["config error: the following arguments are required: --config "
                               "(python -m system.train --help)"]
    capsys.readouterr()
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("model, data, reward, rollout", "system/config.py", "--print-config", "exit codes",
                 "130", "bad input"):
        assert word in text, word


@pytest.mark.parametrize("raised, code, expected", [
    (KeyboardInterrupt(), 130, "interrupted: continue from the beginning (no checkpoint yet: "
                               "checkpoint.every sets how often) with: python -m system.train --config "),
    (RuntimeError("learner 1 fell over\nmore detail"), 1, "error: RuntimeError: learner 1 fell over (traceback in "),
])
def test_interrupt_and_failure_during_training_exit_with_one_line_and_the_resume_command(
        tmp_path, capsys, monkeypatch, raised, code, expected):
    import system.train

    def training(*args, **kwargs):
        raise raised

    monkeypatch.setattr(system.train, "train", training)
    rc, _, err = _main(capsys, _args(tmp_path, _data(tmp_path / "t.jsonl", GOOD)))
    assert rc == code and len(err) == 1 and err[0].startswith(expected), err
    assert err[0].endswith(" trainer.resume=auto") and "Traceback" not in err[0]


def test_make_run_checkpoints_often_and_resumes():
    from system.config import load_config

    cfg = load_config(DEBUG)
    assert 1 <= cfg.checkpoint.every <= 20 and cfg.trainer.steps % cfg.checkpoint.every == 0
    run_line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "system.train" in x)
    assert "trainer.resume=auto" in run_line
