"""What an actor is built with: one typed, frozen settings object per role, made from the loaded
config (whose `auto` values load_config has already made concrete) and passed to the actor whole.

The workers restate no defaults: every field is what the config says, so the saved config.yaml of
a run is the whole story. `learner_settings(cfg)` is the only place that reads the config for a
learner rank; the KL mode and the rollout correction are looked up here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from system.algo.kl import KLMode, get_kl_mode
from system.algo.off_policy import CorrectionSettings
from system.config import Config, lora_sync_mode


@dataclass(frozen=True)
class LearnerSettings:
    # the process
    torch_threads: int  # ray.torch_threads
    seed: int  # seed (each rank adds 1000 * rank)
    dtype: str  # model.dtype
    attn_implementation: str  # model.attn_implementation
    # the model
    gradient_checkpointing: bool
    ref_transport: str  # hidden | logprobs: what the reference rows hold (hidden with adapters_off)
    temperature: float  # rollout.temperature: the log-probs and the KL are of these distributions
    lora: dict  # learner.lora as a dict (workers/lora.py); rank 0: full fine-tuning
    sync_mode: str  # full | merged | adapters: what a weight sync sends
    # the optimizer (DeepSpeed engine)
    optimizer: str
    lr: float
    betas: tuple
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    zero_stage: int
    micro_batch: int  # rows per rank and minibatch
    # the update
    packing: str  # on: packed micro-batches (position_ids restart per sequence) | off: padded per micro-batch
    minibatches: int
    epochs: int
    chunk_size: int | None  # rows of the fused head + KL at a time (None: all)
    max_len: int  # rollout.max_new_tokens (the seq-mean-token-sum-norm aggregation divides by it)
    # the objective
    kl: KLMode  # algo.kl.mode, looked up
    kl_coef: float  # in the loss (0 where the mode puts the KL in the reward)
    kl_seq_weight: str
    kl_prefix_cap: float
    clip_low: float
    clip_high: float
    dual_clip: float
    aggregation: str
    pi_old: str  # sampler | proximal
    rollout_correction: str
    correction: CorrectionSettings

    @property
    def lora_rank(self) -> int:
        return self.lora["rank"]


def learner_settings(cfg: Config) -> LearnerSettings:
    """What a learner rank is built and trained with (workers/learner.py)."""
    c, lr, a = cfg, cfg.learner, cfg.algo
    kl = get_kl_mode(a.kl.mode)
    return LearnerSettings(
        torch_threads=c.ray.torch_threads, seed=c.seed, dtype=c.model.dtype,
        attn_implementation=c.model.attn_implementation, packing=lr.packing,
        gradient_checkpointing=lr.gradient_checkpointing,
        ref_transport="hidden" if c.reference.source == "adapters_off" else c.reference.transport,
        temperature=c.rollout.temperature, lora=dataclasses.asdict(lr.lora), sync_mode=lora_sync_mode(c),
        optimizer=lr.optimizer, lr=lr.lr, betas=tuple(lr.betas), weight_decay=lr.weight_decay,
        warmup_steps=lr.warmup_steps, grad_clip=lr.grad_clip, zero_stage=lr.zero_stage,
        micro_batch=c.trainer.prompts_per_step * c.rollout.group_size // (lr.num_ranks * lr.minibatches),
        minibatches=lr.minibatches, epochs=lr.epochs, chunk_size=lr.chunk_size,
        max_len=c.rollout.max_new_tokens,
        kl=kl, kl_coef=a.kl.coef if kl.in_loss else 0.0, kl_seq_weight=a.kl.seq_weight,
        kl_prefix_cap=a.kl.prefix_cap, clip_low=a.clip_low, clip_high=a.clip_high,
        dual_clip=a.dual_clip, aggregation=a.aggregation, pi_old=a.pi_old,
        rollout_correction=a.rollout_correction,
        correction=CorrectionSettings(a.tis_cap, tuple(a.mis_bounds), a.mis_level))


# learner settings that shape the processes or the weights the rollout workers hold: a run that
# changes one of them needs new actors; the others go to the learners with reset()
LEARNER_PROCESS_FIELDS = ("torch_threads", "dtype", "attn_implementation", "lora", "sync_mode")
