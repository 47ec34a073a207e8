"""The chaos run: one training run of the debug config through a seeded schedule of mixed faults,
compared with the same run without them. Does a run that loses workers, a node, a learner rank,
its driver, a weight sync, an update and rewards still end with the model it would have produced?

    python -m system.experiments.chaos                    # 50 steps, 13 faults (~12 min on 2 cores)
    python -m system.experiments.chaos --steps 24 --checkpoint-every 6 --out /tmp/chaos   # shorter

Steps:
1. A Ray cluster on 127.0.0.1 (ray.cluster_utils, token authentication, a private RAY_TMPDIR): a
   head without CPUs, a learner node and two sampler nodes, placed by custom resources as a user
   places roles on a real cluster (as tests/integration/multinode_run.py).
2. The fault-free run, and the control run: fault-free but for the schedule's NaN gradients (an
   update skipped by design, the one fault that changes the weights). One driver process, one
   actor set for both.
3. The chaos run (system/chaos.py: the schedule, and the hook that injects it): each submission a
   driver process of its own (`--driver`, below), as `python -m system.train` would be. A
   submission that stops with "Resubmit the same command with trainer.resume=auto" (a learner rank
   lost), or whose driver was killed, is resubmitted with trainer.resume=auto, as a user would;
   any other end stops the experiment with one line naming it and the driver's log.
4. The report (printed, and in <out>/report.md): per fault its step, when it struck, the line that
   shows it handled, and the seconds it cost (the chaos run's time from that step's start to the
   next step's start, less the fault-free run's); the totals; and the final weights of the three
   runs compared bit for bit (else the largest difference). docs/reliability.md has the figures.

The chaos run is on-policy (trainer.rollout_ahead=0): a step redone after a worker restart then
samples again with the same policy and seeds. With rollout_ahead >= 1 the sample drawn ahead by an
older policy is lost with its worker and drawn again by the current one: the run is as sound, but
no longer the same run (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from system import chaos
from system.chaos import Fault

ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = ["learner.resources={learner_node: 0.5}", "rollout.resources={sampler_node: 0.5}",
             "reference.resources={sampler_node: 0.25}"]
MAX_SUBMISSIONS = 6
# how a fault shows handled: a line of its driver's output after the fault's [chaos] line (a
# regular expression) and, from its groups, what the report says
_RESTART = r"\[faults\] (.*?) restarted during (.*?) \(.*"
HANDLED = {
    "rollout_killed": (_RESTART, "{0} restarted by Ray, {1} redone"),
    "rollout_killed_generating": (_RESTART, "{0} restarted by Ray, {1} redone"),
    "node_lost": (_RESTART, "{0} restarted on the other node, {1} redone"),
    "rollout_killed_mid_sync": (_RESTART, "{0} restarted by Ray, {1} redone"),
    "reference_killed": (_RESTART, "{0} restarted by Ray, {1} redone"),
    "sync_corrupted": (r"\[faults\] weight sync: .*\((policy version \d+)\): retrying the sync once",
                       "checksums differ, sync of {0} retried"),
    "nonfinite_update": (r"\[faults\] step \d+: (\d+) update\(s\) skipped .*",
                         "{0} update(s) skipped (NaN gradients), counted"),
    "reward_hangs": (r"rewards: ([1-9]\d*) timed out.*", "{0} reward(s) past reward.timeout_s: "
                                                        "worker replaced, scored 0"),
    "reward_raises": (r"rewards: \d+ timed out, \d+ over the memory limit, ([1-9]\d*) failed.*",
                      "{0} reward(s) raised: scored 0"),
    "learner_killed": (r"error: (learner rank \d+) on .* died.*", "run stopped ({0} died)"),
    "driver_killed_mid_checkpoint": (None, "driver gone, checkpoint not committed"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="the run's seed and the schedule's")
    p.add_argument("--out", default="outputs/chaos")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--driver", help=argparse.SUPPRESS)  # internal: one driver process (a JSON spec)
    return p.parse_args(argv)


# ---- a driver process: what `python -m system.train` is, with the hook installed ---------------
def driver(spec_path: str) -> int:
    """Run spec["runs"] one after another on the cluster at spec["address"], sharing one actor
    set; each run {"args", "schedule", "log", "tokens"} with its chaos hook installed."""
    import ray

    from system.actors import ActorPool
    from system.train import main

    spec = json.loads(Path(spec_path).read_text())
    ray.init(address=spec["address"], log_to_driver=False)
    pool, rc = ActorPool(), 0
    try:
        for run in spec["runs"]:
            hook = chaos.Hook([Fault(*f) for f in run["schedule"]], run["log"], run["tokens"])
            with chaos.installed(hook):
                rc = main(run["args"], pool=pool)
            if rc:
                break
    finally:
        pool.close()
    return rc


# ---- the experiment ------------------------------------------------------------------------------
def start_cluster():
    """A head without CPUs (it holds the drivers only) and three tagged worker nodes."""
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1", "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                              **local})
    for tag, cpus in (("learner_node", 2), ("sampler_node", 1), ("sampler_node", 1)):
        cluster.add_node(num_cpus=cpus, resources={tag: 1}, **local)
    cluster.wait_for_nodes()
    return cluster


def submit(out: Path, name: str, address: str, runs: list[dict]) -> tuple[int, str, float]:
    """One driver process; (exit code, its output, seconds). Its output goes to <out>/logs/<name>.log,
    and its [chaos], [faults], [resume] and error lines to the console too."""
    spec = out / "logs" / f"{name}.json"
    spec.write_text(json.dumps({"address": address, "runs": runs}))
    log = out / "logs" / f"{name}.log"
    t0 = time.monotonic()
    lines = []
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "system.experiments.chaos", "--driver", str(spec)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
            if line.startswith(("[chaos]", "[faults]", "[resume]", "[setup]", "error:", "[checkpoint]")):
                print(f"  {name}: {line.rstrip()}", flush=True)
        proc.wait()
    return proc.returncode, "".join(lines), time.monotonic() - t0


def run_experiment(args) -> str:
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="raychaos-", dir="/tmp")  # short: AF_UNIX socket paths
    os.environ.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                      RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                      TOKENIZERS_PARALLELISM="false",
                      PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    os.environ.pop("RAY_ADDRESS", None)
    schedule = chaos.plan(args.seed, args.steps, args.checkpoint_every)
    print(f"[chaos] schedule (seed {args.seed}): " + ", ".join(f"{f.step}:{f.kind}" for f in schedule),
          flush=True)
    base = ["--config", "configs/debug.yaml", f"output_dir={out}", f"trainer.steps={args.steps}",
            f"checkpoint.every={args.checkpoint_every}", "trainer.rollout_ahead=0",
            "reward.num_workers=2", "reward.timeout_s=2", "sync.timeout_s=60", f"seed={args.seed}",
            f"data.seed={args.seed}", "trainer.progress_bar=false", "logging.tensorboard=false",
            "ray.log_to_driver=false", *PLACEMENT, *args.set]

    def run_spec(name: str, faults: list[Fault]) -> dict:
        log, tokens = str(out / "logs" / f"{name}.jsonl"), str(out / "logs" / f"{name}-tokens")
        hook = chaos.Hook(faults, log, tokens)
        return {"args": [*base, f"run_name={name}", *hook.overrides()],
                "schedule": [[f.step, f.kind] for f in faults], "log": log, "tokens": tokens}

    cluster = start_cluster()
    try:
        t0 = time.monotonic()
        nonfinite = [f for f in schedule if f.kind == "nonfinite_update"]
        rc, text, _ = submit(out, "clean", cluster.address, [run_spec("clean", []),
                                                               run_spec("control", nonfinite)])
        if rc:
            raise SystemExit(f"the fault-free runs failed (exit code {rc}): see {out}/logs/clean.log")
        clean_s = time.monotonic() - t0
        spec, submissions = run_spec("chaos", schedule), []
        t0 = time.monotonic()
        while True:
            rc, text, seconds = submit(out, f"chaos-{len(submissions) + 1}", cluster.address, [spec])
            submissions.append({"rc": rc, "out": text, "seconds": seconds})
            if rc == 0:
                break
            error = next((l for l in reversed(text.splitlines()) if l.startswith("error:")), "")
            resumable = rc == -9 or "trainer.resume=auto" in error
            if not resumable or len(submissions) >= MAX_SUBMISSIONS:
                raise SystemExit(f"the chaos run did not survive submission {len(submissions)} "
                                 f"(exit code {rc}): {error or 'no error line'}; driver log: "
                                 f"{out}/logs/chaos-{len(submissions)}.log")
            if "trainer.resume=auto" not in spec["args"]:
                spec["args"].append("trainer.resume=auto")  # the same command, as a user resubmits it
        chaos_s = time.monotonic() - t0
    finally:
        import ray

        ray.shutdown()
        try:
            cluster.shutdown()
        except Exception as err:  # noqa: BLE001 - the lost node's processes are already gone
            print(f"[chaos] cluster shutdown: {err}", flush=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = report(out, args, schedule, submissions, clean_s, chaos_s)
    (out / "report.md").write_text(text + "\n")
    return text


# ---- the report ----------------------------------------------------------------------------------
def _step_times(log: list[dict]) -> dict[int, list[tuple[float, int]]]:
    times: dict = {}
    for e in log:
        if e["event"] == "step":
            times.setdefault(e["step"], []).append((e["t"], e["pid"]))
    return times


def seconds_lost(fault_event: dict, chaos_steps: dict, clean_steps: dict) -> float | None:
    """The chaos run's seconds from the start of the fault's step to the start of the next one
    (in whatever submission that came), less the fault-free run's for the same two steps."""
    k, t = fault_event["step"], fault_event["t"]
    start = max((s for s, _ in chaos_steps.get(k, []) if s <= t), default=None)
    end = min((s for s, _ in chaos_steps.get(k + 1, []) if s > t), default=None)
    if start is None or end is None or k not in clean_steps or k + 1 not in clean_steps:
        return None
    return (end - start) - (clean_steps[k + 1][0][0] - clean_steps[k][0][0])


def handled(fault: dict, submissions: list[dict], pids: list[int]) -> str:
    """How `fault` was handled, from the output of the submission it struck (and of the next one,
    for a stopped or killed driver), or '' when that output does not show it."""
    if fault["pid"] not in pids:
        return ""
    i = pids.index(fault["pid"])
    text = submissions[i]["out"]
    after = text[text.find(f"[chaos] step {fault['step']}: {fault['kind']}"):]
    pattern, say = HANDLED[fault["kind"]]
    groups: tuple = ()
    if pattern:
        m = re.search(rf"^{pattern}$", after, re.MULTILINE)
        if not m:
            return ""
        groups = m.groups()
    line = say.format(*groups)
    back = re.search(r"^\[faults\] recovered in ([0-9.]+)s", after, re.MULTILINE)
    if "restarted" in say and back:
        line += f" (back in {back.group(1)}s)"
    if fault["kind"] in ("learner_killed", "driver_killed_mid_checkpoint"):
        nxt = submissions[i + 1]["out"] if i + 1 < len(submissions) else ""
        m = re.search(r"^\[resume\] from .*: step (\d+)", nxt, re.MULTILINE)
        if not m:
            return ""
        line += f"; resubmitted with trainer.resume=auto, resumed from step {m.group(1)}"
    return line


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "final" / "model.safetensors")


def compare(a: dict, b: dict) -> str:
    if a.keys() != b.keys():
        return "different tensors"
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and (a[k] == b[k]).all())]
    if not differ:
        return f"bit-equal ({len(a)} tensors, {sum(v.numel() for v in a.values()):,} values)"
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in differ)
    return f"differ in {len(differ)} of {len(a)} tensors, largest |difference| {worst:.3g}"


def report(out: Path, args, schedule: list[Fault], submissions: list[dict], clean_s: float,
           chaos_s: float) -> str:
    log = chaos.read_log(str(out / "logs" / "chaos.jsonl"))
    chaos_steps = _step_times(log)
    clean_steps = _step_times(chaos.read_log(str(out / "logs" / "clean.jsonl")))
    pids = []
    for e in log:  # the driver process of each submission, in order
        if e["pid"] not in pids:
            pids.append(e["pid"])
    faults = [e for e in log if e["event"] == "fault"]
    rows, survived, lost_total = [], 0, 0.0
    for f in faults:
        line = handled(f, submissions, pids)
        lost = seconds_lost(f, chaos_steps, clean_steps)
        survived += bool(line)
        lost_total += lost or 0.0
        rows.append(f"| {f['step']} | {f['kind']} | {Fault(f['step'], f['kind']).phase} | "
                    f"{line or 'NOT HANDLED'} | {'?' if lost is None else f'{lost:.1f}'} |")
    outs = "".join(s["out"] for s in submissions)
    restarts = re.findall(r"^\[faults\] (.*) restarted during", outs, re.MULTILINE)
    workers = sum(len(r.split(", ")) for r in restarts)
    recoveries = [float(x) for x in re.findall(r"^\[faults\] recovered in ([0-9.]+)s", outs, re.MULTILINE)]
    clean, control, chaotic = (_weights(out / n) for n in ("clean", "control", "chaos"))
    nan_steps = [f.step for f in schedule if f.kind == "nonfinite_update"]
    missing = sorted({(f.step, f.kind) for f in schedule} - {(f["step"], f["kind"]) for f in faults})
    lines = [
        f"Chaos run: {args.steps} steps of configs/debug.yaml (seed {args.seed}, on-policy, checkpoint "
        f"every {args.checkpoint_every}), on a loopback cluster of 4 nodes; schedule seed {args.seed}",
        "",
        "| step | fault | when | handled (from the driver's output) | seconds lost |",
        "|---:|---|---|---|---:|",
        *rows,
        "",
        f"- faults injected: {len(faults)} of {len(schedule)} scheduled"
        + (f" (never reached: {missing})" if missing else "") + f"; survived: {survived}",
        f"- restarts: {len(submissions) - 1} of the run (submissions' exit codes "
        f"{[s['rc'] for s in submissions]}, each after the first resubmitted with trainer.resume=auto)"
        f", {workers} of workers by Ray",
        f"- worker recoveries: {len(recoveries)}, {sum(recoveries):.1f}s in them, the longest "
        f"{max(recoveries, default=0):.1f}s (from the failed call noticed to the workers back)",
        f"- seconds lost, summed over the faults: {lost_total:.0f}; wall time: chaos run {chaos_s:.0f}s "
        f"(all submissions), fault-free run and control {clean_s:.0f}s (one driver, one start-up)",
        f"- final weights, chaos vs fault-free: {compare(chaotic, clean)}"
        + (f" (the update of step {', '.join(map(str, nan_steps))} skipped for its NaN gradients, by "
           f"design)" if nan_steps else ""),
        f"- final weights, chaos vs control (fault-free but the same update skipped): "
        f"{compare(chaotic, control)}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.driver:
        return driver(args.driver)
    print(run_experiment(args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
