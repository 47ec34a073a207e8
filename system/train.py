"""Entrypoint: load config -> validate -> build actors -> run the GRPO loop.

    python -m system.train --config configs/debug.yaml [key=value ...]

Steps: resolve and validate the config (dotlist overrides on the command line), print it and save
it with the run; build the debug model when model.path=debug; load and tokenize the prompts;
attach to a running Ray cluster (RAY_ADDRESS, or `ray start` on this machine) or start a local
one; check the cluster has the resources the config asks for; start the actors; train; save the
final policy as a Hugging Face model directory; print a summary table.
Outputs: <output_dir>/<run_name>/{config.yaml, metrics.jsonl, tensorboard/, final/, summary.json}.
A key the chosen mode ignores (data.train_path with data.source=synthetic) gets one line on stderr,
"config warning: <key>: ignored (...)", and the run goes on.
Exit codes: 0 done; 2 a bad config or data (one line on stderr: "config error: ..."); 1 the run
stopped on a failure it cannot survive (one line on stderr: "error: ..." with how to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from system.config import ConfigError, ignored_keys, load_config, to_yaml
from system.metrics import MetricsLogger, progress_bar, summary_table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/debug.yaml", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.steps=5")
    return p.parse_args(argv)


def resolve_model(cfg) -> str:
    """The model directory: the debug model built (or taken from its cache), or cfg.model.path."""
    if cfg.model.path == "debug":
        from system.debug_model import ensure_debug_model

        return ensure_debug_model(cfg.model.debug_cache, cfg.model.debug_settings)
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a model directory (no config.json)")
    return cfg.model.path


def init_ray(cfg) -> None:
    """Attach to the cluster this runs in (job submission, RAY_ADDRESS, a local `ray start`),
    else start a local one sized for the config."""
    import ray

    from system.resources import required_resources

    if ray.is_initialized():  # embedded use (tests, notebooks): keep the caller's cluster
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # no runtime_env here: a submitted job's own runtime env would clash with it; the actors get
    # their environment from ActorGroup
    kwargs = {"log_to_driver": cfg.ray.log_to_driver}
    if address and address != "local":
        ray.init(address=address, **kwargs)
        return
    if address != "local":
        try:
            ray.init(address="auto", **kwargs)
            return
        except ConnectionError:
            pass
    need = required_resources(cfg)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need.get("CPU", 0) + 0.999)),
             include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for line in ignored_keys(cfg):
            print(f"config warning: {line}", file=sys.stderr, flush=True)
        run_dir = os.path.abspath(os.path.join(cfg.output_dir, cfg.run_name))
        os.makedirs(run_dir, exist_ok=True)
        resolved = to_yaml(cfg)
        print(f"[config] resolved ({args.config}):\n{resolved}", flush=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(resolved)
        model_path = resolve_model(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from system.faults import RunStopped

    try:
        return train(cfg, model_path, run_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def train(cfg, model_path: str, run_dir: str) -> int:
    import ray
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from system.data.prompts import load_prompt_sets
    from system.resources import ResourceError, check_cluster_resources
    from system.rewards.pool import RewardPool
    from system.trainer import Phases, Trainer

    t0 = time.perf_counter()
    setup = Phases()  # start-up, printed on one line once the actors are ready
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        prompts = load_prompt_sets(cfg, tokenizer)
    except (OSError, ValueError) as err:  # missing, empty or unusable dataset: name it, no traceback
        raise ConfigError(str(err) if str(err).startswith("data.") else f"data: {err}") from None
    print(f"[data] {len(prompts.train)} train prompts, {len(prompts.heldout)} held-out {prompts.stats}")
    with setup("ray.init"):
        init_ray(cfg)
    try:
        check_cluster_resources(cfg, ray.cluster_resources())
    except ResourceError as err:
        print(f"resource error: {err}", file=sys.stderr)
        return 2
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard,
                           cfg.logging.wandb_project if cfg.logging.wandb else None,
                           config=OmegaConf.to_container(OmegaConf.structured(cfg)))
    specs = [{"name": s.name, "weight": s.weight, "kwargs": dict(s.kwargs)} for s in cfg.reward.functions]
    with RewardPool(specs, cfg.reward.num_workers, cfg.reward.timeout_s) as pool:
        trainer = Trainer(cfg, model_path, tokenizer, prompts, run_dir)
        trainer.rewards = pool
        try:
            trainer.start_actors()
            total = time.perf_counter() - t0
            setup.seconds.update(trainer.startup.seconds)
            setup.seconds["the rest"] = total - sum(setup.seconds.values())  # tokenizer, data, logger
            print(f"[setup] actors ready in {total:.1f}s ({setup.line()})", flush=True)
            with progress_bar(cfg.trainer.steps, cfg.trainer.progress_bar) as bar:
                result = trainer.fit(logger, bar)
            trainer.save_policy(os.path.join(run_dir, "final"))
        finally:
            trainer.stop_actors()
            logger.close()
    result["seconds"] = time.perf_counter() - t0
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = [(k, f"{result['start'].get(k, float('nan')):.3f}", f"{v:.3f}")
            for k, v in result["end"].items()]
    print(f"\nSummary of {cfg.run_name} ({cfg.trainer.steps} steps, {result['seconds']:.0f}s), "
          f"held-out set of {cfg.eval.size}:\n{summary_table(rows)}")
    print(f"outputs: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
