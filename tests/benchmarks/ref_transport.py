"""Reference transport: bytes per response token and seconds per step, `hidden` against `logits`.

The real workers.reference.ReferenceWorker runs as a Ray actor, as in the trainer; for each model
and transport the driver times, on the same batch (medians of --reps after one warm-up):
- forward in-process: ReferenceWorker.forward called in the driver process (compute only, no Ray);
- ray.get(forward): the trainer's reference phase (actor computes, rows come back through Ray);
- to learner: shipping the rows from the driver to another actor (the trainer's learn() does this);
- learner ref log-probs: what the learner does with the rows before updating (pi_ref log-probs of
  the sampled tokens: logprobs_from_hidden with the frozen reference head, or logprobs_from_logits).
The bytes are the size of the rows returned ([M, H] or [M, V]), per response token.

Models (random initialisation, built into a temporary directory, nothing downloaded):
- debug: system.debug_model.build_tokenizer / build_model (H 128, V 24, float32), a batch of 128
  sequences (6 prompt tokens, 8 response tokens; bytes per token do not depend on the batch);
- qwen0.5b-shape: Qwen2.5-0.5B's shapes (H 896, intermediate 4864, 14 heads, 2 kv heads,
  V 151936, tied embeddings) with 2 layers, in --qwen-dtype (bfloat16 by default), batch of
  --qwen-batch sequences x --qwen-response response tokens (16 x 128 by default: the
  pipeline's 64 x 256 would put 5 GB of bf16 logits through Ray, more than this machine can spare;
  bytes per token do not depend on the batch, seconds scale with it).
Target: hidden ships >= 30x fewer bytes than logits for the Qwen shapes (V/H = 170 at equal dtype).

Run from the repository root (about 2-4 minutes on 2 CPU cores):
    python tests/benchmarks/ref_transport.py
    python tests/benchmarks/ref_transport.py --qwen-batch 64 --qwen-response 256   # the pipeline's batch
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

from _common import ROOT, markdown_table, median, verdict, publish, save_qwen_shape

import ray  # noqa: E402
import torch  # noqa: E402

TARGET = 30.0


@ray.remote(num_cpus=0)
class Sink:
    """Stands in for a learner rank receiving its reference rows."""

    def take(self, rows: torch.Tensor) -> int:
        return rows.numel()


def build_debug(out_dir: str) -> dict:
    from system.debug_model import build_model, build_tokenizer

    build_tokenizer(out_dir)
    model = build_model(out_dir)
    return {"path": out_dir, "H": model.config.hidden_size, "V": model.config.vocab_size,
            "dtype": "float32", "batch": 128, "prompt": 6, "response": 8}


def build_qwen_shape(out_dir: str, dtype: str, batch: int, response: int, prompt: int) -> dict:
    save_qwen_shape(out_dir, dtype, layers=2)
    return {"path": out_dir, "H": 896, "V": 151936, "dtype": dtype, "batch": batch,
            "prompt": prompt, "response": response}


def make_batch(spec: dict, seed: int = 0) -> dict:
    """Random prompts and responses, every response spec['response'] tokens long."""
    from system.data.batch import build_batch

    g = torch.Generator().manual_seed(seed)
    V, B = spec["V"], spec["batch"]
    prompts = torch.randint(3, V, (B, spec["prompt"]), generator=g).tolist()
    responses = torch.randint(3, V, (B, spec["response"]), generator=g).tolist()
    return build_batch(prompts, responses, pad_id=0).reference_inputs(slice(None))


def learner_ref_logp(rows: torch.Tensor, transport: str, head: torch.Tensor,
                     tokens: torch.Tensor) -> float:
    from system.algo.fused_kl import logprobs_from_hidden
    from system.algo.kl import logprobs_from_logits

    t0 = time.perf_counter()
    with torch.no_grad():
        if transport == "hidden":
            logprobs_from_hidden(rows, head, tokens)
        else:
            logprobs_from_logits(rows, tokens)
    return time.perf_counter() - t0


def measure(name: str, spec: dict, args) -> list[dict]:
    from workers.reference import ReferenceWorker

    batch = make_batch(spec)
    tokens = batch["input_ids"][:, 1:][batch["loss_mask"].bool()]
    n_tokens = int(batch["loss_mask"].sum())
    sink = Sink.remote()
    out = []
    for transport in ("hidden", "logits"):
        kwargs = dict(model_path=spec["path"], dtype=spec["dtype"], transport=transport,
                      torch_threads=args.threads, seed=0, max_tokens=32768, packed=False)
        local = ReferenceWorker(**kwargs)
        head = local.model.get_output_embeddings().weight.detach()
        actor = ray.remote(ReferenceWorker).options(num_cpus=0).remote(**kwargs)
        times = {"local": [], "ray": [], "ship": [], "learner": []}
        nbytes = None
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            t0 = time.perf_counter()
            local.forward(**batch)
            t_local = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = ray.get(actor.forward.remote(**batch))
            t_ray = time.perf_counter() - t0
            rows, nbytes = result["rows"], result["bytes"]
            t0 = time.perf_counter()
            ray.get(sink.take.remote(rows))
            t_ship = time.perf_counter() - t0
            t_learn = learner_ref_logp(rows, transport, head, tokens)
            del result, rows
            gc.collect()
            if rep:
                for k, v in zip(times, (t_local, t_ray, t_ship, t_learn)):
                    times[k].append(v)
        ray.kill(actor)
        del local, head
        gc.collect()
        row = {"model": name, "transport": transport, "H": spec["H"], "V": spec["V"],
               "dtype": spec["dtype"], "tokens": n_tokens, "bytes": nbytes,
               "batch": f"{spec['batch']}x{spec['response']}",
               **{k: median(v) for k, v in times.items()}}
        print(f"[ref_transport] {name} {transport}: {nbytes / n_tokens:.0f} B/token, "
              + ", ".join(f"{k} {row[k]:.3f}s" for k in times), flush=True)
        out.append(row)
    ray.kill(sink)
    return out


def report(results: list[dict], args) -> str:
    headers = ["model", "dtype", "batch (seqs x resp)", "transport", "bytes/token", "MB/step",
               "forward in-process s", "ray.get(forward) s", "to learner s", "learner ref logp s",
               "step total s"]
    rows, summary = [], []
    for r in results:
        total = r["ray"] + r["ship"] + r["learner"]
        r["total"] = total
        rows.append([r["model"], r["dtype"], r["batch"], r["transport"], f"{r['bytes'] / r['tokens']:.0f}",
                     f"{r['bytes'] / 2**20:.1f}", f"{r['local']:.3f}", f"{r['ray']:.3f}", f"{r['ship']:.3f}",
                     f"{r['learner']:.3f}", f"{total:.3f}"])
    s_headers = ["model", "V/H", "bytes logits/hidden", "ray.get time logits/hidden",
                 "step total logits/hidden", "target (bytes)", "status"]
    by_model: dict[str, dict] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["transport"]] = r
    for model, d in by_model.items():
        h, lg = d["hidden"], d["logits"]
        ratio = lg["bytes"] / h["bytes"]
        is_qwen = model.startswith("qwen")
        summary.append([model, f"{h['V'] / h['H']:.1f}", f"{ratio:.1f}x", f"{lg['ray'] / h['ray']:.2f}x",
                        f"{lg['total'] / h['total']:.2f}x", f">= {TARGET:g}x" if is_qwen else "(none)",
                        verdict(ratio >= TARGET) if is_qwen else ""])
    return (f"Real ReferenceWorker as a Ray actor ({args.threads} torch thread(s)); randomly initialised "
            f"models; seconds are medians of {args.reps} reps after one warm-up; step total = "
            f"ray.get(forward) + to learner + learner ref logp.\n\n"
            + markdown_table(headers, rows) + "\n\n" + markdown_table(s_headers, summary) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qwen-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--qwen-batch", type=int, default=16, help="sequences per step (Qwen shape)")
    ap.add_argument("--qwen-response", type=int, default=128, help="response tokens (Qwen shape)")
    ap.add_argument("--qwen-prompt", type=int, default=64, help="prompt tokens (Qwen shape)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (actor and driver)")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=4 * 2**30, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        results = []
        with tempfile.TemporaryDirectory(prefix="ref_transport_") as tmp:
            debug_dir, qwen_dir = os.path.join(tmp, "debug"), os.path.join(tmp, "qwen")
            results += measure("debug", build_debug(debug_dir), args)
            spec = build_qwen_shape(qwen_dir, args.qwen_dtype, args.qwen_batch, args.qwen_response,
                                    args.qwen_prompt)
            results += measure("qwen0.5b-shape", spec, args)
    finally:
        ray.shutdown()
    body = report(results, args) + f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.\n"
    publish('ref_transport', 'hidden vs logits reference transport', body, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
