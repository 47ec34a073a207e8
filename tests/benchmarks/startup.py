"""Time to first step: the debug config's `[setup] actors ready` time, this tree against a baseline
revision, side by side in one run.

    python tests/benchmarks/startup.py [--baseline REV] [--repeats N] [--steps S] [--no-append]

Each repeat runs, for the baseline tree (`git archive REV`, by default the commit before the
start-up work) and for this tree, in alternating order:
1. "first run after install": `python -m system.train --config configs/debug.yaml` (trainer.steps=S,
   eval off, a local Ray cluster) with TORCH_EXTENSIONS_DIR pointing at a new, empty directory,
   as on a machine where nothing was ever compiled for this installation;
2. "repeat run": the same command again with the directory the first run left behind.
It reads the `[setup] actors ready in ...` line of each run (and this tree's phases, printed on the
same line); and, for this tree, "next run, actors reused": two runs one after the other in one
process with a system.actors.ActorPool, the second resetting the first's actors (the case of the
test suite and the experiments' grids), whose own line it reads. Per run: the CPU seconds of all the run's processes (Ray's included, sampled), from the launch
to that line (the driver's imports included, which the line's clock leaves out) and to the end,
which what else runs on the machine moves far less than the times; the wall time of the run;
whether it compiled anything into TORCH_EXTENSIONS_DIR; and the load average before it. It checks
that both trees trained the same (the runs share seed, model and data): every metric both log, of
every step, timings left out, equal to the last bit, else within float32 rounding (relative 1e-5:
a tree that sums the same terms in another order, e.g. in other micro-batch shapes, differs from
the 6th digit on), else not.
Both trees use the same debug model, built once with a short warm start (its weights do not change
the start-up; MODEL below).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table, median, publish, verdict  # noqa: E402

BASELINE = "a05e573"  # the commit before the start-up work (issue 24, part 1)
TARGET_S = 15.0
MODEL = ["model.debug_settings={warm_start: {steps: 30}}",
         f"model.debug_cache={ROOT / '.cache' / 'debug_model'}"]
TIMING_KEYS = re.compile(r"^(time|time_.*|step_s|tokens_per_s|reward_time_s)$")
FLOAT32_REL = 1e-5  # metrics of two trees that sum the same terms in another order
READY = re.compile(r"\[setup\] actors ready in ([\d.]+)s(?: \((.*)\))?")


def checkout(rev: str, into: Path) -> Path:
    """The tree of `rev` (tracked files) under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


class ProcessTreeCPU:
    """CPU seconds of a process and all its descendants (Ray's processes and workers, a compiler),
    from samples every 0.2 s: each process counts as last seen. Own times only: a parent's
    children_* times would count again the descendants already sampled."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.seen = psutil.Process(pid), {}

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass

    def total(self) -> float:
        return sum(self.seen.values())


def run(tree: Path, ext_dir: Path, out_dir: Path, name: str, steps: int) -> dict:
    """One training run of the debug config from `tree`; its start-up line, wall time and records."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(tree), TORCH_EXTENSIONS_DIR=str(ext_dir),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "system.train", "--config", "configs/debug.yaml", *MODEL,
           f"trainer.steps={steps}", "eval.size=0", "trainer.progress_bar=false",
           f"output_dir={out_dir}", f"run_name={name}", "ray.address=local", "ray.log_to_driver=false"]
    built = lambda: set(ext_dir.rglob("*.so")) if ext_dir.exists() else set()  # noqa: E731
    before = built()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    errors: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    cpu, cpu_ready = ProcessTreeCPU(proc.pid), None
    while proc.poll() is None:
        cpu.sample()
        if cpu_ready is None and any(READY.search(line) for line in list(lines)):
            cpu_ready = cpu.total()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    reader.join()
    stdout = "".join(lines)
    cpu_ready = cpu.total() if cpu_ready is None else cpu_ready  # the run ended within a sample
    match = READY.search(stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"run failed (rc={proc.returncode}) in {tree}: {' '.join(cmd)}\n"
                         f"{stdout[-3000:]}\n{''.join(errors)[-3000:]}")
    phases = {}
    for part in (match.group(2) or "").split(", "):
        if part:
            key, _, value = part.rpartition(" ")
            phases[key] = float(value.rstrip("s"))
    with open(out_dir / name / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    compiled = bool(built() - before)  # this run compiled an op (a first run leaves it for the next)
    print(f"  {name}: actors ready {float(match.group(1)):.1f}s (CPU {cpu_ready:.1f}s), wall "
          f"{wall:.1f}s (CPU {cpu.total():.1f}s), load {load:.2f}, compiled {compiled}", flush=True)
    return {"ready": float(match.group(1)), "phases": phases, "wall": wall, "cpu": cpu.total(),
            "cpu_ready": cpu_ready, "load": load, "compiled": compiled, "train": train}


_REUSE = """
import sys
from system.actors import ActorPool
from system.cluster import init_ray
from system.config import load_config
from system.train import main

overrides = sys.argv[1:]
init_ray(load_config("configs/debug.yaml", overrides))
pool = ActorPool()
for name in ("first", "second"):
    if main(["--config", "configs/debug.yaml", *overrides, f"run_name={name}"], pool=pool) != 0:
        raise SystemExit(f"run {name} failed")
pool.close()
"""


def reused(tree: Path, out_dir: Path, steps: int) -> dict:
    """Two runs in one process sharing an ActorPool: the second one's start-up line and records,
    and whether it trained as the first did."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(tree), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    overrides = [*MODEL, f"trainer.steps={steps}", "eval.size=0", "trainer.progress_bar=false",
                 f"output_dir={out_dir}", "ray.address=local", "ray.log_to_driver=false"]
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", _REUSE, *overrides], cwd=tree, env=env,
                          capture_output=True, text=True)
    found = READY.findall(proc.stdout)
    if proc.returncode != 0 or len(found) != 2:
        raise SystemExit(f"reused runs failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    ready, phases = float(found[1][0]), dict(p.rpartition(" ")[::2] for p in found[1][1].split(", "))
    records = []
    for name in ("first", "second"):
        with open(out_dir / name / "metrics.jsonl") as f:
            records.append([r for r in map(json.loads, f) if r["kind"] == "train"])
    print(f"  reused: actors ready {ready:.1f}s (the first run's {float(found[0][0]):.1f}s), "
          f"load {load:.2f}", flush=True)
    return {"ready": ready, "phases": {k: float(v.rstrip("s")) for k, v in phases.items()},
            "load": load, "same": not metrics_differ(records[0], records[1])}


def metrics_differ(a: list[dict], b: list[dict], rel_tol: float = 1e-9) -> list[str]:
    """Keys of the train records that are not equal between two runs (timings left out), within
    rel_tol for floats."""
    bad = []
    for ra, rb in zip(a, b, strict=True):
        for key in sorted(set(ra) | set(rb)):
            if TIMING_KEYS.match(key):
                continue
            va, vb = ra.get(key), rb.get(key)
            same = (va == vb or (isinstance(va, float) and isinstance(vb, float)
                                 and math.isclose(va, vb, rel_tol=rel_tol, abs_tol=1e-12)))
            if not same:
                bad.append(f"step {ra['step']} {key}: {va} vs {vb}")
    return bad


def largest_relative_difference(a: list[dict], b: list[dict]) -> tuple[float, str]:
    """The largest |x - y| / max(|x|, |y|) over the float metrics of two runs, and where."""
    worst, where = 0.0, ""
    for ra, rb in zip(a, b, strict=True):
        for key in sorted(set(ra) & set(rb)):
            va, vb = ra[key], rb[key]
            if TIMING_KEYS.match(key) or not (isinstance(va, float) and isinstance(vb, float)):
                continue
            d = abs(va - vb) / max(abs(va), abs(vb), 1e-12)
            if d > worst:
                worst, where = d, f"step {ra['step']} {key}"
    return worst, where


def trees_agree(pairs: list[tuple[list[dict], list[dict]]]) -> str:
    """Whether the baseline and this tree trained the same, on the metrics both log: to the last
    bit; else within float32 rounding (FLOAT32_REL: the trees may sum in another order, e.g. other
    micro-batch shapes); else the first differences. Names the metrics only one tree logs."""
    def keys(records: list[dict]) -> set:
        return {k for r in records for k in r}

    def common(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict]]:
        both = keys(a) & keys(b)
        return tuple([{k: v for k, v in r.items() if k in both} for r in x] for x in (a, b))

    shared = [common(a, b) for a, b in pairs]
    only = sorted(set().union(*(keys(a) ^ keys(b) for a, b in pairs)))
    also = f" (only one tree logs {', '.join(only)})" if only else ""
    if not any(metrics_differ(a, b) for a, b in shared):
        return "equal to the last bit" + also
    far = [d for a, b in shared for d in metrics_differ(a, b, rel_tol=FLOAT32_REL)]
    worst, where = max(largest_relative_difference(a, b) for a, b in shared)
    if not far:
        return (f"equal within float32 rounding, not to the last bit (largest relative difference "
                f"{worst:.1e}, {where}; tolerance {FLOAT32_REL:g}){also}")
    return "NOT equal: " + "; ".join(far[:5]) + also


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default=BASELINE, help="git revision of today's start-up path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="training steps per run (metrics compared)")
    p.add_argument("--no-append", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = p.parse_args()

    results: dict = {}
    pairs = []  # (baseline, this tree) train records of each repeat's first runs
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:  # trees, outputs, extensions
        work = Path(tmp)
        trees = {"baseline": checkout(args.baseline, work / "baseline"), "this tree": ROOT}
        results.update({(v, c): [] for v in trees for c in ("first", "repeat")})
        reuse = []
        for i in range(args.repeats):
            order = list(trees) if i % 2 == 0 else list(trees)[::-1]
            print(f"repeat {i + 1}/{args.repeats}: {' then '.join(order)}", flush=True)
            runs = {}
            for version in order:
                # new and empty: as after install
                ext_dir = work / f"ext-{i}-{version.replace(' ', '_')}"
                for case in ("first", "repeat"):
                    name = f"{version.replace(' ', '_')}-{i}-{case}"
                    runs[version, case] = run(trees[version], ext_dir, work / "out", name, args.steps)
                    results[version, case].append(runs[version, case])
            pairs.append((runs["baseline", "first"]["train"], runs["this tree", "first"]["train"]))
            reuse.append(reused(ROOT, work / f"reuse-{i}", args.steps))

    rows = []
    for (version, case), rs in results.items():
        ready = [r["ready"] for r in rs]
        rows.append([version, "first run after install" if case == "first" else "repeat run",
                     f"{median(ready):.1f}", f"{min(ready):.1f}-{max(ready):.1f}",
                     f"{median(r['cpu_ready'] for r in rs):.1f}",
                     f"{median(r['wall'] for r in rs):.1f}", f"{median(r['cpu'] for r in rs):.1f}",
                     "yes" if any(r["compiled"] for r in rs) else "no",
                     ", ".join(f"{r['load']:.1f}" for r in rs)])
    ready = [r["ready"] for r in reuse]
    rows.append(["this tree", "next run, actors reused", f"{median(ready):.1f}",
                 f"{min(ready):.1f}-{max(ready):.1f}", "", "", "", "no",
                 ", ".join(f"{r['load']:.1f}" for r in reuse)])
    table = markdown_table(["tree", "case", "actors ready s (median)", "min-max",
                            "CPU s to actors ready (median)", "run wall s (median)", "run CPU s (median)",
                            "run compiled an op", "load average before each run"], rows)
    phase_names = list(results["this tree", "first"][0]["phases"])
    phase_rows = [[name] + [f"{median(r['phases'].get(name, math.nan) for r in results['this tree', c]):.1f}"
                            for c in ("first", "repeat")] for name in phase_names]
    phases = markdown_table(["phase (this tree, driver's view)", "first run s (median)",
                             "repeat run s (median)"], phase_rows)
    worst = max(r["ready"] for c in ("first", "repeat") for r in results["this tree", c] + reuse)
    body = (f"Baseline: `{args.baseline}` (`git archive`), against this tree; {args.repeats} repeats, "
            f"order alternating; each run {args.steps} training steps of configs/debug.yaml with eval "
            f"off, a local Ray cluster, and the debug model built with a 30-step warm start (shared "
            f"by both trees). `first run after install`: TORCH_EXTENSIONS_DIR new and empty; "
            f"`repeat run`: the directory that first run left.\n\n{table}\n\n{phases}\n\n"
            f"Training metrics of every step (timings left out), baseline vs this tree: "
            f"{trees_agree(pairs)}; the run on reused "
            f"actors trained as the run that started them: "
            f"{'yes' if all(r['same'] for r in reuse) else 'NO'} (its phases: "
            f"{'; '.join(', '.join(f'{k} {v:.1f}s' for k, v in r['phases'].items()) for r in reuse)}).\n\n"
            f"Target: actors ready <= {TARGET_S:.0f} s on every run of this tree: "
            f"{verdict(worst <= TARGET_S)} (slowest {worst:.1f} s).\n")
    publish("startup", "time to first step, debug config", body, append=not args.no_append)


if __name__ == "__main__":
    main()
