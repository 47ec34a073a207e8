"""Does the exact KL matter in real off-policy training? The debug task, trained per KL mode and
staleness, and the final policy's true KL to the reference measured over the whole vocabulary.

Grid: algo.kl.mode in {full, k3, k3_is} x trainer.rollout_ahead k in {0, 1, 2, 4}, plus mu = 2
epochs (learner.epochs=2) at k = 0 for each mode; same seeds, same steps, a KL coefficient large
enough that the KL term matters (--kl-coef). Every run is `system.train.main` on configs/debug.yaml
with the overrides printed below the table, one after another on one local Ray cluster.

Per run:
    true KL      the final policy's KL(pi_theta^T || pi_ref^T) on held-out prompts: --samples
                 responses per prompt sampled from the final policy at the rollout temperature T,
                 and at every response position the exact sum over the vocabulary (the reference is
                 the debug model the run started from). Mean per response token, and per response
                 (the sum over its positions: by the chain rule an unbiased estimate of the
                 sequence-level KL, exact per visited state).
    k3 - full    the logged `kl_gap` (k3 estimate minus the exact full-vocabulary KL of the batch,
                 both of pi_theta at the sampled states), mean over the steps and over the last
                 quarter of them
    accuracy     held-out greedy accuracy at the end (eval.size prompts)
    s/step       mean logged step_s; wall: the run's seconds, start-up included

Run:
    python -m system.experiments.offpolicy_kl                   # table in docs/offpolicy_kl.md, plot
    python -m system.experiments.offpolicy_kl --steps 4 --modes full --ks 0 1 --no-docs   # a smoke run
    python -m system.experiments.offpolicy_kl --ks 4 --no-mu2 --no-docs \
        --set algo.pi_old=proximal algo.rollout_correction=tis    # the decoupled objective at k = 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from system.experiments import save_figure

MODES = ("full", "k3", "k3_is")
KS = (0, 1, 2, 4)


def grid(modes, ks, mu2: bool) -> list[dict]:
    """One entry per run: kl mode, staleness k, epochs mu; every mode at one k before the next k
    (the ends of the k range first), so that a grid cut short still compares the modes."""
    order = sorted(ks, key=lambda k: (k not in (min(ks), max(ks)), k))
    runs = [{"mode": m, "k": k, "mu": 1} for k in order for m in modes]
    if mu2:
        runs += [{"mode": m, "k": 0, "mu": 2} for m in modes]
    return runs


def overrides(run: dict, args) -> list[str]:
    return [f"algo.kl.mode={run['mode']}", f"algo.kl.coef={args.kl_coef}",
            f"trainer.rollout_ahead={run['k']}", f"learner.epochs={run['mu']}",
            f"trainer.steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
            f"eval.size={args.eval_size}", "eval.every=0", "trainer.progress_bar=false",
            "logging.tensorboard=false", f"seed={args.seed}", f"data.seed={args.seed}", *args.set]


@torch.no_grad()
def true_kl(policy_dir: str, ref_dir: str, prompts: list[list[int]], samples: int,
            temperature: float, max_new_tokens: int, seed: int) -> tuple[float, float]:
    """(mean per-token, mean per-response) KL(pi_theta^T || pi_ref^T) over responses the policy
    samples for `prompts`, exact over the vocabulary at every response position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from system.algo.kl import full_kl_from_logits

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ref_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    total, n_tokens, n_seqs = 0.0, 0, 0
    by_length: dict[int, list[list[int]]] = {}
    for ids in prompts:  # prompts of one length batch without padding
        by_length.setdefault(len(ids), []).append(ids)
    for P, group in sorted(by_length.items()):
        x = torch.tensor(group)  # [g, P]
        out = policy.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, num_return_sequences=samples,
                              pad_token_id=pad, eos_token_id=eos)  # [g * S, P + R]
        resp = out[:, P:]  # [g * S, R]
        # response tokens up to and including the first EOS
        is_eos = (resp == eos).long()
        mask = (is_eos.cumsum(-1) - is_eos) == 0  # [g * S, R]
        attn = torch.cat([torch.ones(out.shape[0], P, dtype=torch.long), mask.long()], dim=1)
        lp = policy(input_ids=out, attention_mask=attn).logits[:, P - 1:-1]  # [g * S, R, V]
        lr = ref(input_ids=out, attention_mask=attn).logits[:, P - 1:-1]  # [g * S, R, V]
        kl = full_kl_from_logits(lp, lr, temperature) * mask  # [g * S, R]
        total += float(kl.sum())
        n_tokens += int(mask.sum())
        n_seqs += out.shape[0]
    return total / max(n_tokens, 1), total / max(n_seqs, 1)


def summarize(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    summary = json.loads((run_dir / "summary.json").read_text())
    last = train[-max(1, len(train) // 4):]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"kl_gap": mean(train, "kl_gap"), "kl_gap_last": mean(last, "kl_gap"),
            "kl_full_last": mean(last, "kl_full"), "max_staleness": max(r["staleness"] for r in train),
            "acc_start": summary["start"].get("greedy_accuracy", float("nan")),
            "acc_end": summary["end"].get("greedy_accuracy", float("nan")),
            "s_per_step": mean(train, "step_s"), "wall_s": summary["seconds"]}


def run_one(run: dict, args, pool=None) -> dict:
    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.train import main, resolve_model

    name = "_".join([f"{run['mode']}_k{run['k']}_mu{run['mu']}", *(o.split("=", 1)[1] for o in args.set)])
    ov = [*overrides(run, args), f"output_dir={args.out}", f"run_name={name}"]
    done = (Path(args.out) / name / "summary.json").exists() and args.reuse
    rc = 0 if done else main(["--config", "configs/debug.yaml", *ov], pool=pool)
    if rc != 0:
        raise SystemExit(f"run {name} failed (rc={rc})")
    cfg = load_config("configs/debug.yaml", ov)
    ref_dir = resolve_model(cfg)
    from transformers import AutoTokenizer

    heldout = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(ref_dir)).heldout[:args.kl_prompts]
    per_token, per_seq = true_kl(str(Path(args.out) / name / "final"), ref_dir,
                                 [r["prompt_ids"] for r in heldout], args.samples,
                                 cfg.rollout.temperature, cfg.rollout.max_new_tokens, args.seed)
    return {**run, "name": name, "true_kl": per_token, "true_kl_seq": per_seq,
            **summarize(Path(args.out) / name)}


def format_table(results: list[dict]) -> str:
    head = ("kl.mode", "k", "mu", "true KL / token", "true KL / response", "k3 - full (mean)",
            "k3 - full (last 1/4)", "max staleness", "greedy acc start -> end", "s/step", "wall s")
    rows = [(r["mode"], r["k"], r["mu"], f"{r['true_kl']:.4f}", f"{r['true_kl_seq']:.4f}",
             f"{r['kl_gap']:+.5f}", f"{r['kl_gap_last']:+.5f}", r["max_staleness"],
             f"{r['acc_start']:.3f} -> {r['acc_end']:.3f}", f"{r['s_per_step']:.2f}",
             f"{r['wall_s']:.0f}") for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in results):
        rs = [r for r in results if r["mode"] == mode and r["mu"] == 1]
        line = axes[0].plot([r["k"] for r in rs], [r["true_kl"] for r in rs], marker="o", label=mode)
        mu2 = [r for r in results if r["mode"] == mode and r["mu"] == 2]
        if mu2:
            axes[0].scatter([0] * len(mu2), [r["true_kl"] for r in mu2], marker="x", s=60,
                            color=line[0].get_color(), label=f"{mode}, mu=2")
        axes[1].plot([r["k"] for r in rs], [r["acc_end"] for r in rs], marker="o", label=mode)
    axes[0].set_title("final KL(pi_theta || pi_ref), exact, held-out")
    axes[0].set_ylabel("KL per response token")
    axes[1].set_title("held-out greedy accuracy at the end")
    for ax in axes:
        ax.set_xlabel("staleness k (trainer.rollout_ahead)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--no-mu2", action="store_true", help="leave out the mu=2, k=0 runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32, help="trainer.prompts_per_step")
    ap.add_argument("--kl-coef", type=float, default=0.2)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--kl-prompts", type=int, default=100, help="held-out prompts for the true KL")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt for the true KL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/offpolicy_kl", help="run directories")
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--no-docs", action="store_true", help="print the table only")
    ap.add_argument("--reuse", action="store_true", help="keep runs already finished in --out")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides for every run, e.g. algo.pi_old=proximal algo.rollout_correction=tis")
    args = ap.parse_args(argv)

    import ray

    torch.set_num_threads(1)  # the driver's share of 2 cores; the actors have their own
    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    from system.actors import ActorPool

    t0, results, pool = time.perf_counter(), [], ActorPool()  # one start-up for the whole grid
    for run in grid(args.modes, args.ks, not args.no_mu2):
        results.append(run_one(run, args, pool))
        r = results[-1]
        print(f"[offpolicy_kl] {r['name']}: true KL {r['true_kl']:.4f}/token, gap {r['kl_gap']:+.5f}, "
              f"acc {r['acc_start']:.3f} -> {r['acc_end']:.3f}, {r['s_per_step']:.2f} s/step", flush=True)
    pool.close()
    ray.shutdown()
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (MODES.index(r["mode"]) if r["mode"] in MODES else 9, r["mu"], r["k"]))
    table = format_table(results)
    settings = " ".join(overrides({"mode": "<mode>", "k": "<k>", "mu": "<mu>"}, args))
    print(f"\n{table}\n\nper run: python -m system.train --config configs/debug.yaml {settings}\n"
          f"true KL: {args.samples} sampled responses on each of {args.kl_prompts} held-out prompts; "
          f"grid wall time {wall:.0f}s")
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"results": results, "settings": settings, "wall_s": wall}, indent=2))
    if not args.no_docs:
        plot(results, args.docs / "offpolicy_kl.png")
        print(f"plot saved to {args.docs / 'offpolicy_kl.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
