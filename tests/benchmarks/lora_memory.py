"""LoRA vs full fine-tuning: peak learner memory and bytes per weight sync.

For each model (the debug model; a Qwen2.5-0.5B-shaped one with --qwen) and each of full
fine-tuning and LoRA (rank 8 on every linear layer of the blocks, debug.yaml's other settings), a
fresh subprocess builds one LearnerWorker exactly as the trainer does (one rank, DeepSpeed over
gloo, --zero stage), runs `prepare` (pi_ref from the base weights with the adapters off, for LoRA)
and one `update` (one optimizer step) on a synthetic batch, and reports:
- peak RSS: VmHWM of that process (/proc/self/status; the whole learner process: weights, the
  frozen reference head, gradients, optimizer state, activations, Python/torch; ru_maxrss would
  carry over the parent's peak across exec);
- state: bytes of parameters + gradients + optimizer state held after the step;
- bytes per sync: the weight buckets one sync broadcasts, per rollout worker (LoRA: merged weights
  and adapters only).

Run from the repository root (about a minute for the debug model on 2 CPU cores; --qwen adds the
0.5B model, several minutes and ~10 GB for its full fine-tuning):
    python tests/benchmarks/lora_memory.py [--qwen] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import ROOT, markdown_table, publish, save_qwen_shape

LORA = ["learner.lora.rank=8"]  # reference.source=auto: adapters_off


def measure(model_path: str, overrides: list[str], rows: int, prompt: int, response: int) -> dict:
    """In this process: one learner step; the figures above (sync bytes for every mode)."""
    sys.path.insert(0, ROOT)
    import torch

    from system.config import load_config
    from system.settings import learner_settings
    from workers.learner import LearnerWorker

    cfg = load_config(os.path.join(ROOT, "configs/debug.yaml"),
                      ["learner.num_ranks=1", "learner.minibatches=1", "rollout.group_size=2",
                       f"trainer.prompts_per_step={rows // 2}", *overrides])
    c = learner_settings(cfg)
    worker = LearnerWorker(0, 1, model_path, c)
    worker.init_process_group(*worker.address())
    worker.build()
    module = worker.engine.module
    V, H = module.head_weight().shape
    g = torch.Generator().manual_seed(0)
    L = prompt + response
    loss_mask = torch.zeros(rows, L - 1)
    loss_mask[:, prompt - 1:] = 1
    shard = {"input_ids": torch.randint(0, V, (rows, L), generator=g),
             "attention_mask": torch.ones(rows, L, dtype=torch.long), "loss_mask": loss_mask}
    M = int(loss_mask.sum())
    ref_rows = None if cfg.reference.source == "adapters_off" else torch.randn(M, H, generator=g)
    worker.prepare(shard, ref_rows)
    worker.update(torch.randn(rows, generator=g), [float(M)])
    params = list(module.parameters())
    state = sum(p.numel() * p.element_size() for p in params)
    state += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt = getattr(worker.engine.optimizer, "optimizer", worker.engine.optimizer)
    state += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                 if torch.is_tensor(t))
    out = {"peak_rss": _peak_rss(), "state": state,
           "trainable": sum(p.numel() for p in params if p.requires_grad),
           "params": sum(p.numel() for p in module.policy.parameters())}
    out["sync_sent"] = sum(b.nbytes for b in worker.weight_buckets(64))  # adapters only, with LoRA
    worker.views["sent"] = worker.views["held"]  # as sync.lora=merged sends
    out["sync_held"] = sum(b.nbytes for b in worker.weight_buckets(64))
    return out


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_child(model_path: str, overrides: list[str], rows: int, prompt: int, response: int) -> dict:
    args = json.dumps([model_path, overrides, rows, prompt, response])
    proc = subprocess.run([sys.executable, __file__, "--child", args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {overrides}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--qwen", action="store_true", help="also a Qwen2.5-0.5B-shaped model (24 layers)")
    p.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage of the learner")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    sys.path.insert(0, ROOT)
    from system.config import load_config
    from system.train import resolve_model

    models = [("debug", resolve_model(load_config(os.path.join(ROOT, "configs/debug.yaml"))), 64, 8, 4)]
    tmp = tempfile.mkdtemp()
    if args.qwen:
        save_qwen_shape(os.path.join(tmp, "qwen"), "float32")
        models.append(("Qwen2.5-0.5B shapes", os.path.join(tmp, "qwen"), 4, 32, 32))
    table = []
    for name, path, rows, prompt, response in models:
        zero = [f"learner.zero_stage={args.zero}"]
        full = run_child(path, zero, rows, prompt, response)
        lora = run_child(path, [*zero, *LORA], rows, prompt, response)
        for label, r in (("full fine-tuning", full), ("LoRA r=8", lora)):
            table.append([name, label, f"{r['trainable']:,}", mib(r["peak_rss"]), mib(r["state"]),
                          mib(r["sync_held"]) + (f" merged, {mib(r['sync_sent'])} adapters"
                                                 if r["sync_sent"] != r["sync_held"] else "")])
    body = (f"One learner rank (ZeRO-{args.zero}, fp32, gloo), one prepare + one optimizer step on a "
            f"synthetic batch (debug: 64 x 12 tokens; Qwen shapes: 4 x 64), each in a fresh "
            f"process. Peak RSS is the process's VmHWM; state is parameters + gradients + "
            f"optimizer state after the step; sync is the bytes one weight sync broadcasts to each "
            f"rollout worker.\n\n" + markdown_table(
                ["model", "training", "trainable params", "peak RSS MiB", "state MiB", "sync MiB"], table))
    publish("lora_memory", "LoRA vs full fine-tuning: learner memory and bytes per sync", body,
            append=not args.no_append)


if __name__ == "__main__":
    main()
