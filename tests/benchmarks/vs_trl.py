"""This project against TRL's GRPOTrainer: wall time per step and reward after N steps, one run.

Both train the debug model (system.debug_model.ensure_debug_model with the config's model.debug_settings, cached under
.cache/debug_model) on the synthetic arithmetic task (system.data.synthetic, train split, reward
exact_reward) with the debug config's settings, read from configs/debug.yaml:
B prompts x G samples per step, rollout.max_new_tokens, learning rate, AdamW betas, gradient
clip, KL coefficient beta, clip ratios, learner.epochs x learner.minibatches optimizer steps per
batch, token-mean loss, group-std-scaled advantages, temperature 1, top-p 1, learning-rate warm-up
then constant.
- this project: `python -m system.train --config configs/debug.yaml trainer.steps=N eval.size=0 ...`
  as a subprocess (Ray actors: a rollout worker, a reference worker, 2 DeepSpeed learner ranks,
  1 torch thread each, full-vocabulary KL), read back from its metrics.jsonl (step_s, reward_mean);
- TRL: GRPOTrainer in a subprocess on CPU (use_cpu, fp32, no vLLM, no gradient checkpointing),
  num_generations = G, per_device_train_batch_size = B*G / minibatches, steps_per_generation =
  minibatches, num_iterations = epochs (so one generation of B*G samples feeds the same optimizer
  steps as one project step), k3 KL in the loss (TRL has no full-vocabulary KL), a callback timing
  each optimizer step (time between consecutive on_step_end; a "step" below is the optimizer steps
  of one generation batch, summed) and recording the logged reward; once per torch thread
  count in --trl-threads in round 1 (1 and 2: on a shared 2-core machine 2 OpenMP threads can be
  many times slower than 1), later rounds with the faster one, which is the one compared; TRL
  loads the very model directory the project's run of the same round trained.
- for reference, extra project runs with --variant overrides (e.g. learner.num_ranks=1: what the
  second DeepSpeed rank costs on this machine).
Every configuration runs --rounds times, interleaved (all of them, then all again), so that load
from other processes on a shared machine hits them alike. Time per step is the median over steps
2..N (the first step holds start-up costs) of a run, and the headline is the best round's; reward
is the mean training reward of the last --last steps (and of the first ones, for reference).
Reward after N steps: both trained policies (the project's outputs/<run>/final, TRL's saved model)
are evaluated alike on the task's held-out prompts: mean reward of G samples per prompt at
temperature 1, and greedy accuracy (heldout_eval). The training reward is shown too, but under
rollout_ahead it lags one update (step k learns from samples of the policy before update k-1).
Target: this project's time per step <= 0.8 x TRL's, at equal or better held-out reward (not
worse by more than two standard errors of the difference).

Needs TRL in the virtualenv (`pip install -e .[bench]`; tested with trl 1.16.0, accelerate 1.15.0,
datasets 5.2.0 on torch 2.13.0+cpu -- pin torch with a constraints file if pip wants to move it).
Run from the repository root (about 5-8 minutes on 2 CPU cores):
    python tests/benchmarks/vs_trl.py
    python tests/benchmarks/vs_trl.py --steps 30 --rounds 1 --variant learner.num_ranks=1 --no-append
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, markdown_table, median, verdict, publish, run_debug_training

RATIO_TARGET = 0.8


def debug_settings() -> dict:
    """The debug config's resolved settings that both trainers share."""
    from system.config import load_config

    cfg = load_config(str(ROOT / "configs" / "debug.yaml"))
    return {
        "B": cfg.trainer.prompts_per_step, "G": cfg.rollout.group_size,
        "max_new_tokens": cfg.rollout.max_new_tokens, "lr": cfg.learner.lr,
        "betas": list(cfg.learner.betas), "weight_decay": cfg.learner.weight_decay,
        "grad_clip": cfg.learner.grad_clip, "beta": cfg.algo.kl.coef, "kl_mode": cfg.algo.kl.mode,
        "epsilon": cfg.algo.clip_low, "epsilon_high": cfg.algo.clip_high,
        "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
        "epochs": cfg.learner.epochs, "minibatches": cfg.learner.minibatches,
        "aggregation": cfg.algo.aggregation, "scale_by_std": cfg.algo.scale_by_std,
        "warmup_steps": cfg.learner.warmup_steps, "seed": cfg.seed,
        "debug_cache": str(ROOT / cfg.model.debug_cache), "debug_settings": dict(cfg.model.debug_settings),
        "task": dataclasses.asdict(cfg.data.synthetic),
        "ranks": cfg.learner.num_ranks, "zero_stage": cfg.learner.zero_stage,
    }


# ---- this project ---------------------------------------------------------------------------


def run_project(steps: int, out_dir: str, extra: list[str]) -> dict:
    r = run_debug_training(out_dir, "vs_trl", [f"trainer.steps={steps}", *extra])
    model = re.search(r"\[debug_model\] (?:cached|ready): (\S+)", r["stdout"])
    return {"command": r["command"], "wall_s": r["wall_s"], "step_s": [x["step_s"] for x in r["train"]],
            "reward": [x["reward_mean"] for x in r["train"]], "final": os.path.join(out_dir, "vs_trl", "final"),
            "model_path": os.path.join(ROOT, model.group(1)) if model else None}


# ---- TRL (child process) --------------------------------------------------------------------


def trl_child(args) -> dict:
    import torch

    torch.set_num_threads(args.trl_threads[0])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from system.data.synthetic import exact_reward, make_task
    from system.debug_model import ensure_debug_model

    s = debug_settings()
    # the model the project's run of this round trained (others may edit the code that is hashed
    # into the debug model's cache key while this benchmark runs)
    path = args.model_path or ensure_debug_model(s["debug_cache"], s["debug_settings"], s["task"])
    train, _ = make_task(**s["task"])
    dataset = Dataset.from_list([{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in train])

    def exact(completions, answer, **_):
        return [exact_reward(c, a) for c, a in zip(completions, answer)]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.rewards, self.last = [], {}, None

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                self.rewards[state.global_step] = logs["reward"]

    # one project step = one generation of B x G samples, then epochs x minibatches optimizer steps
    n, k = s["B"] * s["G"], s["minibatches"]
    if n % k:
        raise SystemExit(f"B*G={n} is not divisible by learner.minibatches={k}")
    config = GRPOConfig(
        output_dir=args.trl_out, max_steps=args.steps * k * s["epochs"], use_cpu=True, bf16=False,
        fp16=False, use_vllm=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=s["seed"], per_device_train_batch_size=n // k,
        gradient_accumulation_steps=1, num_generations=s["G"], steps_per_generation=k,
        num_iterations=s["epochs"], max_completion_length=s["max_new_tokens"],
        learning_rate=s["lr"], warmup_steps=s["warmup_steps"],
        lr_scheduler_type="constant_with_warmup" if s["warmup_steps"] else "constant",
        adam_beta1=s["betas"][0], adam_beta2=s["betas"][1], weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"], beta=s["beta"], epsilon=s["epsilon"],
        epsilon_high=s["epsilon_high"], loss_type="dapo",
        scale_rewards="group" if s["scale_by_std"] else "none",
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    clock = StepClock()
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    final = os.path.join(args.trl_out, "final")
    trainer.save_model(final)
    tokenizer.save_pretrained(final)
    import trl

    per_batch = k * s["epochs"]  # optimizer steps per generation batch, timed together
    times = [sum(clock.times[i:i + per_batch]) for i in range(0, len(clock.times), per_batch)]
    return {"step_s": times, "final": final,
            "reward": [clock.rewards[k] for k in sorted(clock.rewards)],
            "versions": {"trl": trl.__version__, "torch": torch.__version__}}


def run_trl(steps: int, threads: int, out_dir: str, model_path: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--steps={steps}",
           "--trl-threads", str(threads), f"--trl-out={out_dir}"]
    if model_path:
        cmd.append(f"--model-path={model_path}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"TRL run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), wall_s=wall)


# ---- the trained policies, evaluated alike ----------------------------------------------------


def heldout_eval(model_path: str, samples: int, seed: int) -> dict:
    """The policy after N steps on the task's held-out prompts, by one evaluator for both trainers:
    mean reward of `samples` responses per prompt at temperature 1 (what training samples), and
    greedy accuracy. The training-reward columns lag by one policy update under rollout_ahead
    (step k's samples come from the policy before update k-1); this does not."""
    import torch
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.data.synthetic import exact_reward
    from workers.common import seed_all
    from workers.rollout import HFBackend

    cfg = load_config(str(ROOT / "configs" / "debug.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = load_prompt_sets(cfg, tokenizer).heldout
    backend = HFBackend(model_path, "float32", torch.device("cpu"))
    prompts, answers = [r["prompt_ids"] for r in rows], [r["answer"] for r in rows]
    out = {"prompts": len(rows), "samples": samples}
    for name, n, greedy in (("reward", samples, False), ("greedy_accuracy", 1, True)):
        seed_all(seed)
        responses, _ = backend.generate(prompts, n, cfg.rollout.temperature, cfg.rollout.top_p,
                                        cfg.rollout.max_new_tokens, greedy, False)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = [exact_reward(t, a) for t, a in zip(texts, (a for a in answers for _ in range(n)))]
        out[name] = statistics.fmean(scores)
        out[name + "_se"] = statistics.stdev(scores) / len(scores) ** 0.5
    return out


# ---- report ---------------------------------------------------------------------------------


def summarize(runs: list[dict], last: int) -> dict:
    """Per-run medians of s/step over steps 2..N; the best run is the headline (least disturbed by
    other load on a shared machine). Rewards from the first run (the runs are seeded alike)."""
    medians = [median(r["step_s"][1:]) for r in runs]
    best = runs[medians.index(min(medians))]
    reward = runs[0]["reward"]
    return {"n": len(runs[0]["step_s"]), "median": min(medians), "medians": medians,
            "mean": statistics.fmean(best["step_s"][1:]), "first": best["step_s"][0],
            "reward_first": statistics.fmean(reward[:last]), "reward_last": statistics.fmean(reward[-last:]),
            "reward_last_se": (statistics.stdev(reward[-last:]) / last**0.5) if last > 1 else 0.0,
            "same_rewards": all(r["reward"] == reward for r in runs), "wall": best["wall_s"],
            "heldout": runs[0]["heldout"]}


def report(runs: dict, s: dict, args) -> str:
    """runs: label -> list of runs, one per round; the first label is the debug config as is."""
    last = args.last
    headers = ["trainer", "steps", "median s/step (2..N), best round", "per round",
               "mean s/step (2..N), best round", "step 1 s", f"train reward first {last}",
               f"train reward last {last} (± s.e.)", "held-out reward after N steps (± s.e.)",
               "held-out greedy accuracy", "wall s (whole subprocess)"]
    rows, stats = [], {}
    for label, rs in runs.items():
        d = stats[label] = summarize(rs, last)
        rows.append([label, d["n"], f"{d['median']:.3f}", " / ".join(f"{m:.3f}" for m in d["medians"]),
                     f"{d['mean']:.3f}", f"{d['first']:.2f}", f"{d['reward_first']:.3f}",
                     f"{d['reward_last']:.3f} ± {d['reward_last_se']:.3f}"
                     + ("" if d["same_rewards"] else " (rounds differ)"),
                     f"{d['heldout']['reward']:.3f} ± {d['heldout']['reward_se']:.3f}",
                     f"{d['heldout']['greedy_accuracy']:.3f}", f"{d['wall']:.0f}"])
    p = stats[next(iter(runs))]
    best = min((k for k in stats if k.startswith("TRL")), key=lambda k: stats[k]["median"])
    t = stats[best]
    ratio = p["median"] / t["median"]
    # equal or better: the held-out reward of the policy after N steps, within two standard errors
    hp, ht = p["heldout"], t["heldout"]
    margin = 2 * (hp["reward_se"] ** 2 + ht["reward_se"] ** 2) ** 0.5
    reward_ok = hp["reward"] >= ht["reward"] - margin
    met = ratio <= RATIO_TARGET and reward_ok
    verdict_table = markdown_table(
        ["ratio project/TRL s/step (best-round medians; TRL at its faster thread count)", "target",
         "held-out reward after N steps: project vs TRL (2 s.e. of the difference)", "status"],
        [[f"{ratio:.2f}", f"<= {RATIO_TARGET} at equal or better reward",
          f"{hp['reward']:.3f} vs {ht['reward']:.3f} (±{margin:.3f}: "
          f"{'equal or better' if reward_ok else 'worse'})", verdict(met)]])
    first = next(iter(runs.values()))[0]
    trl_versions = next(r for k, v in runs.items() if k.startswith("TRL") for r in v)["versions"]
    setting = (f"Shared settings (configs/debug.yaml): B={s['B']} prompts x G={s['G']} samples per step, "
               f"max_new_tokens={s['max_new_tokens']}, lr={s['lr']:g} (constant after {s['warmup_steps']} "
               f"warm-up optimizer steps), betas={s['betas']}, "
               f"grad clip {s['grad_clip']:g}, beta={s['beta']:g}, clip {s['epsilon']:g}/{s['epsilon_high']:g}, "
               f"mu={s['epochs']}, minibatches={s['minibatches']}, {s['aggregation']}, N={args.steps} steps, "
               f"{args.rounds} round(s), each running every row once, in order. "
               f"This project: KL mode `{s['kl_mode']}`, {s['ranks']} DeepSpeed ranks (ZeRO-{s['zero_stage']}) "
               f"unless the row says otherwise, Ray actors with 1 torch thread each. TRL "
               f"{trl_versions['trl']} (torch {trl_versions['torch']}): k3 KL, one process. "
               f"Project command: `python {first['command']}`.")
    return setting + "\n\n" + markdown_table(headers, rows) + "\n\n" + verdict_table + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="times every configuration runs, interleaved")
    ap.add_argument("--last", type=int, default=5, help="steps averaged for the reward")
    ap.add_argument("--trl-threads", type=int, nargs="+", default=[1, 2],
                    help="torch thread counts TRL runs with in round 1; later rounds run the faster one")
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra project run with these overrides (space-separated), shown for reference; "
                         "e.g. --variant learner.num_ranks=1")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    ap.add_argument("project_overrides", nargs="*", help="extra dotlist overrides for this project's run")
    args = ap.parse_args()

    if args.child:
        result = trl_child(args)
        print(json.dumps(result))
        return 0

    t0 = time.perf_counter()
    s = debug_settings()
    from system.debug_model import ensure_debug_model

    ensure_debug_model(s["debug_cache"], s["debug_settings"], s["task"])  # build it (if needed) outside the timing
    configs = [("this project" + (f" ({' '.join(v)})" if v else ""), "project", v)
               for v in [[], *[v.split() for v in args.variant]]]
    configs += [(f"TRL GRPOTrainer, {t} torch thread(s)", "trl", t) for t in args.trl_threads]
    runs: dict = {label: [] for label, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        for rnd in range(args.rounds):
            model_path = None
            for i, (label, kind, arg) in enumerate(configs):
                out = os.path.join(tmp, f"r{rnd}_{i}")
                if kind == "trl" and rnd > 0 and len(args.trl_threads) > 1:
                    trl = {k: median(v[0]["step_s"][1:]) for k, v in runs.items() if k.startswith("TRL")}
                    if label != min(trl, key=trl.get):
                        continue  # later rounds: only TRL's faster thread count
                if kind == "project":
                    run = run_project(args.steps, out, [*args.project_overrides, *arg])
                    model_path = model_path or run["model_path"]
                else:
                    run = run_trl(args.steps, arg, out, model_path)
                run["heldout"] = heldout_eval(run["final"], s["G"], s["seed"])
                runs[label].append(run)
                print(f"[vs_trl] round {rnd + 1} {label}: median {median(run['step_s'][1:]):.3f} s/step, "
                      f"rewards {[round(r, 3) for r in run['reward']]}, held-out {run['heldout']}",
                      flush=True)
    body = report(runs, s, args) + f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.\n"
    publish('vs_trl', 'this project vs TRL GRPOTrainer, debug model', body, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
