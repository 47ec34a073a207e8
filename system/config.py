"""Configuration: dataclass schemas, YAML + command-line dotlist overrides, `auto` made concrete.

    cfg = load_config("configs/debug.yaml", ["algo.kl.mode=k3", "trainer.steps=5"])

An unknown key, a value of the wrong type or an impossible combination raises ConfigError with
one line that names the key and the reason (the cross-field checks are system/config_checks.py's
validate(), which load_config runs). A key that the chosen mode ignores (data.train_path with
data.source=synthetic) is not an error: config_checks.ignored_keys() lists it, and system.train
prints one warning line for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException



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
            cfg.sync.backend = "nccl" if owns_whole_gpus(cfg.learner) and owns_whole_gpus(cfg.rollout) else "gloo"
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
    from system.config_checks import validate  # which imports this module's schema

    validate(cfg)
    return cfg


def packs_for_free(attn_implementation: str, num_gpus: float) -> bool:
    """Whether packed rows cost no attention on padding: FlashAttention 2's varlen kernels and flex
    attention's block mask skip across sequences; SDPA and eager compute the whole [S, S] scores
    of a packed row under a block-diagonal mask (transformers' masking_utils), which on long
    responses costs more than per-micro-batch padding. On a GPU only."""
    return num_gpus > 0 and attn_implementation in ("flash_attention_2", "flex_attention")


def lora_sync_mode(cfg: Config) -> str:
    """What a sync sends: full (no LoRA), merged or adapters (sync.lora, made concrete at load)."""
    return "full" if cfg.learner.lora.rank == 0 else cfg.sync.lora


def uses_sampler_logprobs(cfg: Config) -> bool:
    """Whether the sampler's own log-probs enter the loss: as pi_old (a sample drawn ahead, by an
    older policy) or as the denominator of the proximal objective's weight."""
    return cfg.trainer.rollout_ahead > 0 or cfg.algo.pi_old == "proximal"


def owns_whole_gpus(role) -> bool:
    """Whether each actor of the role has whole GPUs to itself (fractions may share one)."""
    return role.num_gpus >= 1 and float(role.num_gpus).is_integer()


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, for printing and saving with the run."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
