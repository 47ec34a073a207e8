"""Entrypoint: load config -> check every input -> build actors -> run the GRPO loop.

    python -m system.train --config configs/debug.yaml [key=value ...]

Steps: resolve and validate the config (dotlist overrides on the command line); decide what the
run directory <output_dir>/<run_name> is for (a new run, the same run continued, or refused:
system/run_dir.py); build the debug model when model.path=debug, else check the model directory;
load and tokenize the prompts; build and try the reward functions; then, with every input checked,
attach to a running Ray cluster or start a local one on 127.0.0.1 (system/cluster.py); check the
cluster has the resources the config asks for; start the actors; save the resolved config to the
run directory; train; save the final policy as a Hugging Face model directory; print a summary.
Outputs: <output_dir>/<run_name>/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/,
summary.json}. A key the chosen mode ignores gets one line on stderr, "config warning: ...".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback

from system.cluster import init_ray
from system.config import Config, ConfigError, load_config, to_yaml
from system.config_checks import ignored_keys
from system.metrics import MetricsLogger, progress_bar, summary_table

EXIT_CODES = """exit codes:
  0    done (also: a rerun of a finished run with trainer.resume=auto, which has nothing to do)
  1    a failure during training: one line on stderr naming it and how to resume
  2    bad input (config, model directory, data, rewards, output_dir, the Ray cluster): one line
       on stderr, "config error: <key>: ...", before anything starts
  130  interrupted (Ctrl-C): one line with the command that continues from the latest checkpoint"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as any other bad input
        self.exit(2, f"config error: {message} (python -m system.train --help)\n")


def parse_args(argv=None):
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    p = _Parser(
        prog="python -m system.train", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (key=value overrides, OmegaConf dotlist): {sections}.\n"
               f"Every key is documented, one comment each, in system/config.py; configs/debug.yaml\n"
               f"is the CPU debug run. --print-config shows the resolved config.\n\n{EXIT_CODES}")
    p.add_argument("--config", required=True, help="YAML config file, e.g. configs/debug.yaml")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (nothing starts)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.steps=5")
    return p.parse_args(argv)


def resolve_model(cfg) -> str:
    """The model directory: the debug model built (or taken from its cache), or cfg.model.path."""
    if cfg.model.path == "debug":
        from system.debug_model import ensure_debug_model

        return ensure_debug_model(cfg.model.debug_cache, cfg.model.debug_settings,
                                  dataclasses.asdict(cfg.data.synthetic))
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a model directory (no config.json)")
    return cfg.model.path


def continue_command(args) -> str:
    """The command line that continues this run from its latest checkpoint."""
    kept = [o for o in args.overrides if not o.startswith("trainer.resume=")]
    return shlex.join(["python", "-m", "system.train", "--config", args.config, *kept,
                       "trainer.resume=auto"])


def main(argv=None, pool=None) -> int:
    """The command line; returns the exit code. pool: a system.actors.ActorPool whose actors
    this run may reuse and leave for the next (a sequence of runs in one process)."""
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, its line printed)
        return done.code if isinstance(done.code, int) else 2
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        for line in ignored_keys(cfg):
            print(f"config warning: {line}", file=sys.stderr, flush=True)
        quiet_third_party_notices(cfg)
        inputs = check_inputs(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started: nothing was written", file=sys.stderr)
        return 130
    if inputs is None:  # a finished run, rerun with trainer.resume=auto
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from system.faults import RunStopped

    run = inputs["run"]
    try:
        return train(cfg, args, **inputs, pool=pool)
    except ConfigError as err:  # found by an actor (a model the learner refuses), or the cluster
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        step = run.latest_checkpoint_step()
        where = (f"its latest checkpoint (step {step})" if step is not None
                 else "the beginning (no checkpoint yet: checkpoint.every sets how often)")
        print(f"\ninterrupted: continue from {where} with: {continue_command(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a failure during training: one line, traceback kept
        log = _write_traceback(run.path if os.path.isdir(run.path) else cfg.output_dir)
        text = str(getattr(err, "cause", None) or err).strip()
        first = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        print(f"error: {first} (traceback in {log}); continue with: {continue_command(args)}",
              file=sys.stderr)
        return 1


def quiet_third_party_notices(cfg) -> None:
    """The driver takes its learners' environment against third-party notices (system.actors), before
    anything here imports DeepSpeed: the actor classes do, and so does saving the debug model it
    builds (transformers' save_pretrained asks accelerate, which imports DeepSpeed)."""
    from system.actors import quiet_third_party

    for key, value in quiet_third_party(cfg).items():
        os.environ.setdefault(key, value)


def _write_traceback(directory: str) -> str:
    """The current exception's traceback in <directory>/error.log (else in the temp dir); its path."""
    import tempfile

    for where in (directory, tempfile.gettempdir()):
        try:
            os.makedirs(where, exist_ok=True)
            log = os.path.join(where, "error.log")
            with open(log, "w") as f:
                traceback.print_exc(file=f)
            return log
        except OSError:
            continue
    return "(not written)"


def check_inputs(cfg) -> dict | None:
    """Every input checked before Ray starts: the run directory, the model, the data, the rewards.
    ConfigError on the first problem; None for a finished run rerun with trainer.resume=auto."""
    from system.data.prompts import describe, load_prompt_sets, warnings
    from system.preflight import check_model_dir, check_rewards
    from system.run_dir import claim

    run = claim(cfg)
    if run.state == "complete":
        print(f"[run] {cfg.run_name} is complete ({run.summary['steps']} steps; summary in "
              f"{run.path}/summary.json): to train again, pick a new run_name=... or delete "
              f"{run.path}", flush=True)
        return None
    model_path = resolve_model(cfg)
    tokenizer = check_model_dir(model_path, cfg.model.trust_remote_code)
    try:
        prompts = load_prompt_sets(cfg, tokenizer)
    except (OSError, ValueError) as err:  # missing, empty or unusable dataset: name it, no traceback
        raise ConfigError(str(err) if str(err).startswith("data.") else f"data: {err}") from None
    check_rewards(cfg, prompts.train[0]["answer"])
    print(f"[data] {describe(cfg, prompts)}", flush=True)
    for line in warnings(cfg, prompts):
        print(f"data warning: {line}", file=sys.stderr, flush=True)
    return {"run": run, "model_path": model_path, "tokenizer": tokenizer, "prompts": prompts}


def train(cfg, args, run, model_path: str, tokenizer, prompts, pool=None) -> int:
    import ray
    from omegaconf import OmegaConf

    from system.actors import ActorPool
    from system.faults import RunStopped
    from system.metrics import Phases
    from system.resources import ResourceError, check_cluster_resources
    from system.rewards.pool import RewardPool
    from system.trainer import Trainer

    t0 = time.perf_counter()
    setup = Phases()  # start-up, printed on one line once the actors are ready
    embedded = ray.is_initialized()  # the caller's cluster (tests, notebooks): left connected
    with setup("ray.init"):
        init_ray(cfg)
    try:
        check_cluster_resources(cfg, ray.cluster_resources())
    except ResourceError as err:
        print(f"resource error: {err}", file=sys.stderr)
        return 2
    specs = [{"name": s.name, "weight": s.weight, "kwargs": dict(s.kwargs)} for s in cfg.reward.functions]
    logger, trainer, done = None, None, False
    pool = pool or ActorPool(keep=False)  # without one, the actors end with the run
    with RewardPool(specs, cfg.reward.num_workers, cfg.reward.timeout_s,
                    memory_limit_mb=cfg.reward.memory_limit_mb) as rewards:
        try:
            try:
                actors = pool.take(cfg, model_path)
            except ResourceError as err:  # placement waited past its limit: the cluster is busy
                print(f"resource error: {err}", file=sys.stderr)
                return 2
            trainer = Trainer(cfg, actors, tokenizer, prompts, run.path, rewards)
            run.begin(to_yaml(cfg))
            total = time.perf_counter() - t0
            setup.seconds.update(actors.startup.seconds)
            setup.seconds["the rest"] = total - sum(setup.seconds.values())  # the logger, the run dir
            print(f"[setup] actors ready in {total:.1f}s ({setup.line()}); resolved config in "
                  f"{run.path}/config.yaml", flush=True)
            logger = MetricsLogger(run.path, cfg.logging.tensorboard,
                                   cfg.logging.wandb_project if cfg.logging.wandb else None,
                                   config=OmegaConf.to_container(OmegaConf.structured(cfg)))
            with progress_bar(cfg.trainer.steps, cfg.trainer.progress_bar) as bar:
                result = trainer.fit(logger, bar)
            trainer.save_policy(os.path.join(run.path, "final"))
            done = True
        except (RunStopped, KeyboardInterrupt):  # stopped by the driver or the user: the actors
            done = True  # finish what they were asked, then are idle (the next run replaces a dead one)
            raise
        finally:  # kept for the next run (which replaces what this one lost) unless it ended otherwise
            pool.give_back(done)
            if logger is not None:
                logger.close()
    if not embedded and ray.is_initialized():  # no actor output may arrive after the summary
        ray.shutdown()
    result.update(seconds=time.perf_counter() - t0, steps=cfg.trainer.steps, run_name=cfg.run_name,
                  heldout_size=min(len(prompts.heldout), cfg.eval.size))
    with open(os.path.join(run.path, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{summary_text(cfg, run.path, result)}\noutputs: {run.path}")
    return 0


def summary_text(cfg, run_dir: str, result: dict) -> str:
    """The closing table: held-out metrics at the start and end, or, without a held-out set, the
    train reward and accuracy of the first and last steps, saying which it is."""
    head = f"Summary of {cfg.run_name} ({cfg.trainer.steps} steps, {result['seconds']:.0f}s)"
    if result["end"]:
        rows = [(k, f"{result['start'].get(k, float('nan')):.3f}", f"{v:.3f}") for k, v in result["end"].items()]
        return f"{head}, held-out set of {result['heldout_size']}:\n{summary_table(rows)}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    first, last = records[0], records[-1]
    rows = [(k, f"{first[k]:.3f}", f"{last[k]:.3f}") for k in ("reward_mean", "accuracy") if k in first]
    return (f"{head}, no held-out set: train reward of step {first['step']} (start) and step "
            f"{last['step']} (end), on sampled responses:\n{summary_table(rows)}")


if __name__ == "__main__":
    sys.exit(main())
