"""Peak memory and time of the fused, chunked log-prob + full-vocabulary KL against the naive
materialised version, forward + backward.

    naive: logits = hidden @ W.T; ref_logits = ref_hidden @ W_ref.T; log_softmax of both; KL; gather;
           backward through autograd (holds several [N, V] tensors)
    fused: system.algo.kl.fused_logprob_kl (O(chunk_size x V), recomputed in backward)

Both compute loss = sum(a * logp + b * kl) for fixed random a, b and backpropagate to hidden and W.
Each runs in a fresh subprocess: on CPU the peak is the child's peak RSS (VmHWM, reset after the
inputs exist) minus its RSS at that point; on CUDA, torch.cuda.max_memory_allocated minus the
allocation after the inputs. Time is the median of --reps runs after one warm-up (the
minimum is shown too: on a shared machine it is the less noisy figure). The parent prints a
table, the ratios naive/fused memory and fused/naive time, a cross-check of the two results, and
appends the table to docs/benchmarks.md with the command, machine and date.

By default two shapes run, one after the other: N=8192 V=32768 H=256, and Qwen's vocabulary
V=151936 at N=2048 (H=256), a length at which the naive version still fits in this machine's memory
(~8 GiB). The fused op's rows per chunk are its default, auto_chunk_size(V) (1024 and 220 rows);
--chunk-size sets them. The targets (memory naive/fused >= 8, time fused/naive <= 1.3) must hold
at every shape.

Run (from the repository root, about 3 minutes on 2 CPU cores):
    python tests/benchmarks/kl_memory.py                                 # both shapes, fp32, cpu
    python tests/benchmarks/kl_memory.py --shape 4096,151936,3584 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from system.algo.kl import auto_chunk_size, fused_logprob_kl  # noqa: E402


# ------------------------------------------------------------------ child: one implementation


def naive_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens):
    logits = (hidden @ weight.T).float()  # [N, V]
    with torch.no_grad():
        ref_logits = (ref_hidden @ ref_weight.T).float()  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logq_all = torch.log_softmax(ref_logits, dim=-1)
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(dim=-1)  # [N]
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [N]
    return logp, kl


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak extra memory (bytes) above the level at start(); RSS on CPU, allocator stats on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:  # reset VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base = _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def child(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=g) / args.h**0.5).to(device, dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(args.n, args.h, generator=g)).to(device, dtype)
    ref_weight = weight.detach().clone()
    tokens = torch.randint(0, args.v, (args.n,), generator=g).to(device)
    a, b = torch.randn(args.n, generator=g).to(device), torch.randn(args.n, generator=g).to(device)

    def step():
        hidden.grad = weight.grad = None
        if args.child == "fused":
            logp, kl = fused_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens,
                                        chunk_size=args.chunk_size or None)
        else:
            logp, kl = naive_logprob_kl(hidden, weight, ref_hidden, ref_weight, tokens)
        (a * logp + b * kl).sum().backward()
        return logp.detach(), kl.detach()

    mem = PeakMemory(device)
    mem.start()
    times = []
    for _ in range(args.reps + 1):  # first run is the warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp, kl = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "impl": args.child,
        "peak_bytes": mem.peak(),
        "time_s": statistics.median(times[1:]),
        "times_s": times,
        "check": {
            "kl_sum": kl.double().sum().item(),
            "logp_sum": logp.double().sum().item(),
            "grad_h_norm": hidden.grad.double().norm().item(),
            "grad_w_norm": weight.grad.double().norm().item(),
        },
    }


# ------------------------------------------------------------------ parent: run both, report


def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def run_child(impl: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", impl]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, results: dict) -> str:
    naive, fused = results["naive"], results["fused"]
    mib = 2**20
    chunk = args.chunk_size or f"auto ({auto_chunk_size(args.v)} rows)"
    lines = [
        f"N={args.n} V={args.v} H={args.h} dtype={args.dtype} device={args.device} "
        f"chunk_size={chunk} reps={args.reps} (median after 1 warm-up)",
        "",
        "| impl  | peak extra memory (MiB) | fwd+bwd median (s) | fwd+bwd min (s) |",
        "|-------|------------------------:|-------------------:|----------------:|",
    ]
    for r in (naive, fused):
        lines.append(
            f"| {r['impl']:<5} | {r['peak_bytes'] / mib:>23.1f} | {r['time_s']:>18.3f} | {min(r['times_s'][1:]):>15.3f} |"
        )
    mem_ratio = naive["peak_bytes"] / max(fused["peak_bytes"], 1)
    time_ratio = fused["time_s"] / naive["time_s"]
    min_ratio = min(fused["times_s"][1:]) / min(naive["times_s"][1:])
    lines += [
        "",
        f"memory naive/fused = {mem_ratio:.1f}x (target >= 8); time fused/naive = {time_ratio:.2f} "
        f"(median; target <= 1.3), {min_ratio:.2f} (min)",
    ]
    diffs = {
        k: abs(fused["check"][k] - naive["check"][k]) / max(abs(naive["check"][k]), 1e-30) for k in naive["check"]
    }
    lines.append("cross-check fused vs naive (relative diff): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return "\n".join(lines), mem_ratio >= 8 and time_ratio <= 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description="fused vs naive full-vocabulary KL: peak memory and time")
    ap.add_argument("--shape", action="append", default=[],
                    help="N,V,H (tokens, vocabulary, hidden); repeatable; default: 8192,32768,256 and "
                         "2048,151936,256")
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)  # one shape, for the child
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--h", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=0, help="rows per chunk (0: auto_chunk_size(V))")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--only", choices=["naive", "fused"], help="run one implementation (no ratios, no append)")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    ap.add_argument("--child", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args)))
        return 0

    shapes = [tuple(int(x) for x in sh.split(",")) for sh in
              (args.shape or ["8192,32768,256", "2048,151936,256"])]
    tables, all_met = [], True
    for args.n, args.v, args.h in shapes:
        argv = [f"--n={args.n}", f"--v={args.v}", f"--h={args.h}", f"--dtype={args.dtype}",
                f"--device={args.device}", f"--chunk-size={args.chunk_size}", f"--reps={args.reps}"]  # fmt: skip
        if args.only:
            r = run_child(args.only, argv)
            print(f"{r['impl']}: peak extra {r['peak_bytes'] / 2**20:.1f} MiB, median {r['time_s']:.3f} s, {r['times_s']}")
            continue
        results = {impl: run_child(impl, argv) for impl in ("naive", "fused")}
        table, met = report(args, results)
        print(table, flush=True)
        tables.append(table)
        all_met = all_met and met
    if args.only:
        return 0
    body = "\n\n".join(tables) + f"\n\nTargets met at every shape: {'yes' if all_met else 'NO'}"
    print(body.rsplit("\n", 1)[-1])
    if not args.no_append:
        out = ROOT / "docs" / "benchmarks.md"
        out.parent.mkdir(exist_ok=True)
        new = not out.exists()
        with open(out, "a") as f:
            if new:
                f.write("# Benchmarks\n\nAppended by the scripts in tests/benchmarks/.\n")
            f.write(
                f"\n## kl_memory: fused vs naive full-vocabulary KL ({datetime.date.today().isoformat()})\n\n"
                f"Command: `{' '.join(['python tests/benchmarks/kl_memory.py', *sys.argv[1:]])}`\n\n"
                f"Machine: {machine_description(args.device)}\n\n{body}\n"
            )
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
