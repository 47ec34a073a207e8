"""Learner and reference throughput on long-tailed response lengths: today's padded path against
token-budget micro-batches (padded per micro-batch, and packed), and the price of the exact KL.

The batch: --rows responses with lengths drawn log-normal (median 150 tokens, sigma 1.0, clipped
to 16..1024; seed 0) after a --prompt-token prompt (64). The model: random weights of
Qwen2.5-0.5B's shapes (H 896, V 151,936, tied head; 24 layers, --layers fewer on a CPU).

- learner tokens/s: one optimizer step of the learner's own code (LearnerWorker._optimizer_step:
  forward + backward of the policy, the fused log-prob + full-vocabulary KL against the frozen
  reference head, gradients accumulated over micro-batches; DeepSpeed replaced by plain autograd,
  one rank) over the batch's real tokens (prompt + response).
  old: one forward over all rows right-padded to the longest, as the learner ran a minibatch
  before; new: micro-batches of at most --budget tokens, each padded to its own longest row, and
  the same packed (one row per micro-batch, position ids restarting per sequence; on CPU/SDPA the
  packed row's attention is computed whole under a block-diagonal mask).
- reference tokens/s: ReferenceWorker.forward (hidden transport), no gradient. old: one forward
  padded to the longest row (the old row-count micro-batch, 64, held every row here); new: budget
  --ref-budget, padded per micro-batch, and packed.
- algo.kl.mode=full vs k3: the new path's step time at V = 151,936. This trainer computes the full
  KL in every mode (kl_full is logged every step), so k3 differs from full by the KL's gradient
  only.
- peak memory: the largest rise of the process's RSS (CPU; VmHWM reset before each) or of
  torch's allocated CUDA memory during each measurement.

Time: the minimum of --reps runs (the first one included); on the CPU, CPU seconds of this
process (--threads torch threads, 1 by default), so that other work on a shared machine does not
inflate them; on CUDA, wall seconds. --plan-only prints, for --rows rows (default 512 there), the tokens each plan computes
(padded to the batch's longest, per micro-batch, packed) without running a model.

    python tests/benchmarks/learner_throughput.py --plan-only
    python tests/benchmarks/learner_throughput.py --layers 2 --rows 12 --budget 1200 --ref-budget 1200  # CPU, ~15 min
    python tests/benchmarks/learner_throughput.py --device cuda --dtype bfloat16 --rows 64 --budget 16384
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from system.data.batch import build_batch, split_for_learners  # noqa: E402
from system.data.micro_batches import micro_batch_cost, plan_micro_batches  # noqa: E402
from tests.benchmarks._common import markdown_table, publish, save_qwen_shape  # noqa: E402
from tests.learner_stub import stub_learner  # noqa: E402
from tests.benchmarks.kl_memory import PeakMemory  # noqa: E402

V = 151936


def response_lengths(rows: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(16, min(1024, round(rng.lognormvariate(5.0106, 1.0)))) for _ in range(rows)]  # e^5.0106 = 150


def make_batch(rows: int, prompt: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = response_lengths(rows, seed)
    prompts = [torch.randint(1, V, (prompt,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
    return build_batch(prompts, responses, pad_id=0)


def plan_table(rows: int, prompt: int, budget: int) -> tuple[str, dict]:
    lengths = [prompt + n for n in response_lengths(rows)]
    real = sum(lengths)
    cells = {"old (padded to the longest)": len(lengths) * max(lengths)}
    for packed in (False, True):
        plans = plan_micro_batches(lengths, budget, packed)
        cost = sum(micro_batch_cost([lengths[i] for i in mb], packed) for mb in plans)
        cells[f"new, {'packed' if packed else 'padded per micro-batch'} ({len(plans)} micro-batches)"] = cost
    table = markdown_table(["plan", "tokens computed", "of which padding", "old/this"],
                           [[k, f"{v:,}", f"{1 - real / v:.1%}", f"{cells['old (padded to the longest)'] / v:.2f}x"]
                            for k, v in cells.items()])
    resp = response_lengths(rows)
    head = (f"{rows} rows, prompt {prompt} tokens, responses log-normal (median 150, sigma 1.0, "
            f"16..1024): median {sorted(resp)[rows // 2]}, max {max(resp)}; real tokens {real:,}; "
            f"budget {budget:,} tokens")
    return head + "\n\n" + table, cells


def learner(policy, ref_head, batch, packed: bool, kl_mode: str, budget, device):
    """A LearnerWorker (one rank, no process group) prepared on the batch with the plan of
    `budget` (None: one micro-batch of every row, today's layout): (worker, micro-batches)."""
    import workers.learner as learner_mod
    from workers.policy import PolicyWithHead

    learner_mod._all_ranks = lambda ok, device: bool(ok)  # one rank, no process group
    split = split_for_learners(batch, 1, 1, "token-mean", budget, packed)
    w = stub_learner(PolicyWithHead(policy, ref_head, temperature=1.0, packed=packed), kl_mode, device,
                     chunk_size=0, kl_coef=0.01, aggregation="token-mean", max_len=1024)
    rows = batch.rows(split.rows[0])
    M, H = int(rows["loss_mask"].sum()), ref_head.shape[1]
    ref_rows = torch.randn(M, H, generator=torch.Generator().manual_seed(1)).to(ref_head.dtype)
    behaviour = torch.full(rows["loss_mask"].shape, -12.0)  # the sampler's log-probs: no pi_old forward
    w.prepare(dict(rows, behavior_logp=behaviour), ref_rows, split.plans[0])
    adv = torch.randn(batch.size, generator=torch.Generator().manual_seed(2))
    return w, w._micro_batches(dict(w.shard, advantages=adv[split.rows[0]]))[0], float(split.normalizers[0])


def timed(fn, reps: int, device) -> tuple[float, int]:
    """(min seconds over reps, peak memory bytes). Seconds: wall clock on CUDA; on the CPU this
    process's CPU time (all its threads), which other work on a shared machine does not inflate."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    mem = PeakMemory(device)
    mem.start()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return min(times), mem.peak()


def run(args) -> str:
    from workers.common import load_causal_lm
    from workers.reference import ReferenceWorker

    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_qwen_shape(tmp, args.dtype, layers=args.layers)
        policy = load_causal_lm(tmp, args.dtype, device, attn_implementation=args.attn)
    ref_head = policy.get_output_embeddings().weight.detach().clone()
    batch = make_batch(args.rows, args.prompt)
    real = int(batch.attention_mask.sum())
    rows, results = [], {}

    def learner_step(packed, kl_mode, budget):
        w, micro, norm = learner(policy, ref_head, batch, packed, kl_mode, budget, device)
        w.engine.train()

        def step():
            policy.zero_grad(set_to_none=True)
            w._optimizer_step(micro, norm, first=False)
        return timed(step, args.reps, device), len(micro)

    ref = ReferenceWorker.__new__(ReferenceWorker)
    ref.model, ref.transport, ref.device = policy, "hidden", device
    inputs = batch.reference_inputs(slice(None))

    def reference(packed, budget):
        ref.max_tokens, ref.packed = budget, packed
        policy.eval()
        return timed(lambda: ref.forward(**inputs), args.reps, device)

    cases = [("learner", "old: padded to the longest", lambda: learner_step(False, "full", None)),
             ("learner", "new: padded per micro-batch", lambda: learner_step(False, "full", args.budget)),
             ("learner", "new: packed", lambda: learner_step(True, "full", args.budget)),
             ("learner", "new: padded per micro-batch, kl.mode=k3", lambda: learner_step(False, "k3", args.budget)),
             ("reference", "old: padded to the longest", lambda: (reference(False, 10**9), 1)),
             ("reference", "new: padded per micro-batch", lambda: (reference(False, args.ref_budget), None)),
             ("reference", "new: packed", lambda: (reference(True, args.ref_budget), None))]
    for role, name, fn in cases:
        (seconds, peak), count = fn()
        results[(role, name)] = seconds
        print(f"{role} {name}: {seconds:.2f} s, peak {peak / 2**20:,.0f} MiB", flush=True)
        rows.append([role, name, f"{seconds:.2f}", f"{real / seconds:,.0f}", f"{peak / 2**20:,.0f}"])
    for role in ("learner", "reference"):
        old = results[(role, "old: padded to the longest")]
        for name in ("new: padded per micro-batch", "new: packed"):
            rows.append([role, f"ratio new/old tokens/s ({name[5:]})", "", f"{old / results[(role, name)]:.2f}x", ""])
    full = results[("learner", "new: padded per micro-batch")]
    k3 = results[("learner", "new: padded per micro-batch, kl.mode=k3")]
    rows.append(["learner", "step time kl.mode=full / k3 (V = 151,936)", "", f"{full / k3:.2f}x", ""])
    table = markdown_table(["role", "path", "seconds", "tokens/s", "peak MiB"], rows)
    plans, _ = plan_table(args.rows, args.prompt, args.budget)
    clock = "wall seconds" if device.type == "cuda" else f"CPU seconds, {args.threads} torch thread(s)"
    return (f"Device {args.device} ({clock}), {args.dtype}, attention {args.attn}, {args.layers} layers of "
            f"Qwen2.5-0.5B's shapes (V = 151,936), learner budget {args.budget:,}, reference budget "
            f"{args.ref_budget:,}, min of {args.reps} runs.\n\n{plans}\n\n{table}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan-only", action="store_true", help="token counts of the plans, no model")
    p.add_argument("--rows", type=int, default=None, help="responses in the batch (8; 512 with --plan-only)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24)")
    p.add_argument("--budget", type=int, default=4096, help="learner.max_tokens_per_micro_batch")
    p.add_argument("--ref-budget", type=int, default=8192, help="reference.max_tokens_per_micro_batch")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa", help="model.attn_implementation")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.plan_only:
        body, _ = plan_table(args.rows or 512, args.prompt, args.budget)
        publish("learner_throughput", "tokens computed by the micro-batch plans (no model)", body,
                append=not args.no_append)
        return
    args.rows = args.rows or 12
    publish("learner_throughput", "learner and reference tokens/s on long-tailed lengths, and full vs k3",
            run(args), append=not args.no_append)


if __name__ == "__main__":
    main()
