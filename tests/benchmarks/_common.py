"""Helpers shared by the benchmarks in tests/benchmarks/: machine description, tables, the report file.

Every benchmark prints a markdown table and appends it to docs/benchmarks.md as a section

    ## <name>: <title> (<date>)

    Command: `python tests/benchmarks/<name>.py ...`

    Machine: <CPU model>, <cores> cores, <RAM> GiB RAM, torch <version>

    Date: <ISO date and time>

    <table and notes>

(the same layout as tests/benchmarks/kl_memory.py, which appends to the same file).
"""

from __future__ import annotations

import datetime
import os
import platform
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "benchmarks.md"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kib / 2**20
    except (OSError, StopIteration):
        return float("nan")


def machine_description() -> str:
    """CPU model, cores, RAM, torch version (and the GPU when there is one)."""
    import torch

    desc = (f"{cpu_model()}, {os.cpu_count()} cores, {ram_gib():.1f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def command_line() -> str:
    """The command that ran this benchmark, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; numbers are expected already formatted as strings."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *map(fmt, cells[1:])])


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def append_report(name: str, title: str, body: str) -> Path:
    """Append one section (command, machine, date, body) to docs/benchmarks.md."""
    REPORT.parent.mkdir(exist_ok=True)
    new = not REPORT.exists()
    now = datetime.datetime.now().astimezone()
    with open(REPORT, "a") as f:
        if new:
            f.write("# Benchmarks\n\nAppended by the scripts in tests/benchmarks/.\n")
        f.write(f"\n## {name}: {title} ({now.date().isoformat()})\n\n"
                f"Command: `{command_line()}`\n\n"
                f"Machine: {machine_description()}\n\n"
                f"Date: {now.isoformat(timespec='seconds')}\n\n{body.rstrip()}\n")
    return REPORT


def publish(name: str, title: str, body: str, append: bool = True) -> None:
    """Print a benchmark's report and, unless told not to, append it to docs/benchmarks.md."""
    print(body)
    if append:
        print(f"appended to {append_report(name, title, body)}")


def run_debug_training(out_dir: str, run_name: str, overrides: list[str]) -> dict:
    """`python -m system.train --config configs/debug.yaml` with eval off and these overrides, as a
    subprocess from the repository root: its command, wall seconds, stdout and train records."""
    cmd = [sys.executable, "-m", "system.train", "--config", "configs/debug.yaml", "eval.size=0",
           "trainer.progress_bar=false", f"output_dir={out_dir}", f"run_name={run_name}",
           "ray.address=local", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, run_name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "stdout": proc.stdout, "train": train}


def save_qwen_shape(out_dir: str, dtype: str, layers: int = 24) -> None:
    """A randomly initialised model of Qwen2.5-0.5B's shapes (H 896, intermediate 4864, 14 heads,
    2 kv heads, V 151936, tied embeddings; 24 layers in the real one) saved to out_dir."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, dtype=dtype)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
