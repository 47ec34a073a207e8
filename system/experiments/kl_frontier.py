"""The accuracy / KL frontier of each KL mode on the debug task, with responses long enough for the
KL-to-go to matter, and a gradient diagnostic on one fixed batch.

Setting. The debug task with the worked chain (data.synthetic.show_steps=true) and four
terms (n_terms=4): a response is the chain "12-3+2=9+2=11" + EOS, ~12 tokens, where today's debug
responses (bare answers, three terms) are ~2.6, too short for anything to follow a token. The
debug model is warm-started on that task (its own cache entry); rollout.max_new_tokens=20.

Frontier grid (``--modes`` x ``--coefs`` x ``--ks`` x ``--seeds``): algo.kl.mode in {full_seq, full,
k3, reward}, KL coefficients, staleness k = trainer.rollout_ahead in {0, 4}, seeds (seed and
data.seed). Per run, `system.train.main` on configs/debug.yaml with the overrides printed below the
table, then
    accuracy     held-out greedy accuracy at the end (eval.size prompts)
    true KL_seq  the final policy's KL between whole responses: --samples fresh responses sampled
                 from it on each of --kl-prompts held-out prompts, the exact per-state KL summed over
                 each response's positions, averaged (system.experiments.offpolicy_kl.true_kl)
Per mode and k: the true KL_seq at matched accuracy: for each seed, log KL_seq interpolated
linearly in accuracy between that seed's coefficients at a target accuracy (the median accuracy of
all runs at that k, unless --target-acc), then mean and standard error over seeds (n = the seeds
whose runs bracket the target). Plot: accuracy against true KL_seq per mode, one panel per k.

Gradient diagnostic (``--diagnostic``, no training): pi_ref is the warm-started debug model, pi_theta
the same with its weights moved by --theta-drift (Gaussian, seeded), pi_old pi_theta moved again by
--old-drift (0: on-policy). One fixed batch (--diag-prompts held-out prompts x --group responses from
pi_old); each mode's gradient of its KL term, summed over tokens per response and averaged over
responses (the sequence-KL scale): full (sum_t grad KL_t), full_seq token / prefix (kl_seq.py), k3
(grad of k3 at the sampled tokens), reward (the score function with the k1 return
sum_{t'>=t} k1, the gradient KL-in-reward puts in the policy gradient). The exact gradient of
KL_seq(pi_theta) is estimated by full_seq on --ref-samples responses drawn from pi_theta itself
(on-policy full_seq is unbiased: tests/unit/test_kl_seq.py): the mean of two independent draws of
--ref-samples responses from pi_theta. Reported per mode: the cosine of its gradient on the fixed
batch with that estimate; the cosine of its gradient on --ref-samples responses from pi_old; and
the cosine of the EXPECTED gradients with the noise removed (inner products of estimates from
independent draws are unbiased for the inner products of the means: <m1, q2> / sqrt(<m1, m2>
<q1, q2>)), which is what tells a biased mode from a noisy one. And the share of the KL-to-go term
in full_seq's gradient norm, ||g_seq - g_full|| / ||g_seq||, on the batch and (noise removed) of
the expectations.

Run:
    python -m system.experiments.kl_frontier                      # the full grid: hours on 2 CPU cores
    python -m system.experiments.kl_frontier --modes full_seq full --coefs 0.2 --ks 0 --seeds 0 \
        --steps 2 --prompts 16 --eval-size 50 --kl-prompts 10 --samples 2 --no-docs   # a smoke run
    python -m system.experiments.kl_frontier --diagnostic         # the gradient diagnostic only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from system.experiments import save_figure

MODES = ("full_seq", "full", "k3", "reward")
COEFS = (0.05, 0.2, 0.8)
KS = (0, 4)
SEEDS = (0, 1, 2)
TASK = ["data.synthetic.show_steps=true", "data.synthetic.n_terms=4",
        "rollout.max_new_tokens=20"]


def overrides(mode, coef, k, seed, args) -> list[str]:
    return [*TASK, f"algo.kl.mode={mode}", f"algo.kl.coef={coef}", f"trainer.rollout_ahead={k}",
            f"trainer.steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
            f"eval.size={args.eval_size}", "eval.every=0", "trainer.progress_bar=false",
            "logging.tensorboard=false", f"seed={seed}", f"data.seed={seed}", *args.set]


def run_one(mode, coef, k, seed, args, pool=None) -> dict:
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.experiments.offpolicy_kl import true_kl
    from system.train import main, resolve_model

    name = f"{mode}_c{coef:g}_k{k}_s{seed}"
    ov = [*overrides(mode, coef, k, seed, args), f"output_dir={args.out}", f"run_name={name}"]
    run_dir = Path(args.out) / name
    if not ((run_dir / "summary.json").exists() and args.reuse):
        rc = main(["--config", "configs/debug.yaml", *ov], pool=pool)
        if rc != 0:
            raise SystemExit(f"run {name} failed (rc={rc})")
    cfg = load_config("configs/debug.yaml", ov)
    ref_dir = resolve_model(cfg)
    heldout = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(ref_dir)).heldout[:args.kl_prompts]
    per_token, per_seq = true_kl(str(run_dir / "final"), ref_dir, [r["prompt_ids"] for r in heldout],
                                 args.samples, cfg.rollout.temperature, cfg.rollout.max_new_tokens, seed)
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    return {"mode": mode, "coef": coef, "k": k, "seed": seed, "name": name,
            "acc": summary["end"].get("greedy_accuracy", float("nan")),
            "acc_start": summary["start"].get("greedy_accuracy", float("nan")),
            "true_kl_seq": per_seq, "true_kl_token": per_token,
            "response_len": sum(r["response_len"] for r in train) / len(train),
            "wall_s": summary["seconds"]}


def kl_at_accuracy(runs: list[dict], target: float) -> float:
    """One seed's log-linear interpolation of KL_seq at accuracy `target` over its coefficients;
    nan when its runs do not bracket the target."""
    pts = sorted((r["acc"], math.log(max(r["true_kl_seq"], 1e-12))) for r in runs)
    for (a0, l0), (a1, l1) in zip(pts, pts[1:]):
        if a0 <= target <= a1:
            return math.exp(l0 if a1 == a0 else l0 + (l1 - l0) * (target - a0) / (a1 - a0))
    return float("nan")


def matched_table(results: list[dict], target_acc: float | None) -> tuple[str, dict]:
    head = ("kl.mode", "k", "target acc", "true KL_seq at target: mean +- s.e.", "seeds", "acc range")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out = {}
    for k in sorted({r["k"] for r in results}):
        at_k = [r for r in results if r["k"] == k]
        accs = sorted(r["acc"] for r in at_k)
        target = target_acc if target_acc is not None else accs[len(accs) // 2]
        for mode in dict.fromkeys(r["mode"] for r in at_k):
            seeds = sorted({r["seed"] for r in at_k if r["mode"] == mode})
            vals = [kl_at_accuracy([r for r in at_k if r["mode"] == mode and r["seed"] == s], target)
                    for s in seeds]
            vals = [v for v in vals if not math.isnan(v)]
            n = len(vals)
            mean = sum(vals) / n if n else float("nan")
            se = (sum((v - mean) ** 2 for v in vals) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
            acc = [r["acc"] for r in at_k if r["mode"] == mode]
            out[(mode, k)] = (mean, se, n)
            lines.append(f"| {mode} | {k} | {target:.3f} | {mean:.4f} +- {se:.4f} | {n}/{len(seeds)} | "
                         f"{min(acc):.3f}-{max(acc):.3f} |")
    return "\n".join(lines), out


def runs_table(results: list[dict]) -> str:
    head = ("kl.mode", "coef", "k", "seed", "acc start -> end", "true KL_seq", "true KL / token",
            "response len", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += [f"| {r['mode']} | {r['coef']:g} | {r['k']} | {r['seed']} | {r['acc_start']:.3f} -> "
              f"{r['acc']:.3f} | {r['true_kl_seq']:.4f} | {r['true_kl_token']:.5f} | "
              f"{r['response_len']:.1f} | {r['wall_s']:.0f} |" for r in results]
    return "\n".join(lines)


def plot(results: list[dict], out: Path, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in results})
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for mode in dict.fromkeys(r["mode"] for r in results):
            rs = [r for r in results if r["mode"] == mode and r["k"] == k]
            ax.scatter([r["true_kl_seq"] for r in rs], [r["acc"] for r in rs], label=mode, s=20)
        ax.set_xscale("log")
        ax.set_xlabel("true KL_seq of the final policy (held-out, per response)")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_title(f"staleness k = {k}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if note:
        fig.suptitle(note, fontsize=9)
    save_figure(fig, out)


def frontier(args) -> int:
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    from system.actors import ActorPool

    t0, results, pool = time.perf_counter(), [], ActorPool()  # one start-up for the whole grid
    try:
        for k in args.ks:  # every mode at one (k, seed) before the next: a grid cut short still compares
            for seed in args.seeds:
                for coef in args.coefs:
                    for mode in args.modes:
                        results.append(run_one(mode, coef, k, seed, args, pool))
                        r = results[-1]
                        print(f"[kl_frontier] {r['name']}: acc {r['acc_start']:.3f} -> {r['acc']:.3f}, "
                              f"true KL_seq {r['true_kl_seq']:.4f}, len {r['response_len']:.1f}", flush=True)
    finally:
        pool.close()
        ray.shutdown()
    wall = time.perf_counter() - t0
    table, _ = matched_table(results, args.target_acc)
    settings = " ".join(overrides("<mode>", "<coef>", "<k>", "<seed>", args))
    text = (f"{table}\n\n{runs_table(results)}\n\nper run: python -m system.train --config "
            f"configs/debug.yaml {settings}\ntrue KL_seq: {args.samples} sampled responses on each of "
            f"{args.kl_prompts} held-out prompts; grid wall time {wall:.0f}s")
    print("\n" + text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"results": results, "settings": settings,
                                                             "wall_s": wall}, indent=2))
    if not args.no_docs:
        plot(results, args.docs / "kl_frontier.png", f"{args.steps} steps x {args.prompts} prompts, "
             f"coefs {args.coefs}, seeds {args.seeds}")
        print(f"plot saved to {args.docs / 'kl_frontier.png'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diagnostic", action="store_true", help="the gradient diagnostic only")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--coefs", nargs="+", type=float, default=list(COEFS))
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=32, help="trainer.prompts_per_step")
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--kl-prompts", type=int, default=100, help="held-out prompts for the true KL")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt for the true KL")
    ap.add_argument("--target-acc", type=float, default=None, help="default: median accuracy at each k")
    ap.add_argument("--out", default="outputs/kl_frontier", help="run directories")
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--no-docs", action="store_true", help="print the tables only")
    ap.add_argument("--reuse", action="store_true", help="keep runs already finished in --out")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    from system.experiments.kl_grad_diagnostic import add_arguments, diagnostic

    add_arguments(ap)
    args = ap.parse_args(argv)
    return diagnostic(args) if args.diagnostic else frontier(args)


if __name__ == "__main__":
    raise SystemExit(main())
