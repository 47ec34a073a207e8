"""LearnerWorker: one DeepSpeed data-parallel rank applying clipped GRPO with full-vocabulary KL.

Steps, driven by system/trainer.py:
1. `init_process_group` + `build`: join DeepSpeed's group (gloo on CPU, NCCL on GPU), wrap the
   policy and a frozen copy of the reference output head in `PolicyWithHead` (workers/policy.py),
   and create the engine (ZeRO 0-3; under ZeRO-3 the output head is registered as an external
   parameter of the wrapper, so DeepSpeed gathers it for the fused op and reduces its gradient). With learner.lora.rank > 0
   the policy is wrapped in peft LoRA adapters and only they train (workers/lora.py).
2. `prepare(shard, ref_rows, plan)`: before any update, in eval mode, the sampled tokens' log-probs
   under pi_old and pi_ref (per-token k1 goes back to the driver for KL-in-reward). All log-probs
   and the KL are of the distributions at the rollout temperature (`PolicyWithHead` says why).
   With LoRA and reference.source=adapters_off no rows come in: pi_ref is the base model, and its
   hidden states come from the learner's own forward with the adapters disabled.
3. `update(advantages, normalizers)`: in training mode (dropout; gradient checkpointing, which
   Hugging Face layers apply only then), mu epochs over the minibatches; each minibatch is one
   optimizer step on its share of the data, with the loss scaled so that the ranks' gradients
   average to the whole minibatch's gradient. The share is run as token-budget micro-batches
   (the plan the driver made, system/data/batch.split_for_learners), each padded to its own
   longest row or packed (learner.packing), their gradients accumulated: the update is the same
   however the rows are cut. A minibatch whose loss or gradients are NaN/inf on any rank is
   skipped on every rank (no optimizer step) and counted (`skipped`).
   Each step's statistics are this rank's share; the driver combines the ranks'
   (`system.metrics.reduce_learner_steps`), so the logged metrics do not depend on the rank count.
4. `send_weights`: rank 0 broadcasts the parameters to the rollout workers (all ranks join the
   gather under ZeRO-3); with LoRA, the merged weights or the adapters alone (sync.lora).

Run through the trainer: `python -m system.train --config configs/debug.yaml`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os

import deepspeed
import torch
import torch.distributed as dist

from system.algo.kl import loss_kl, sampled_kl
from system.algo.kl_seq import seq_kl_term, sequence_kl
from system.algo.losses import grpo_loss
from system.algo.off_policy import rollout_correction
from system.config import ConfigError
from system.data.batch import shard_rows
from system.data.micro_batches import in_row_order
from system.metrics import combine_pieces
from system.settings import LearnerSettings
from workers.common import load_causal_lm, output_head_problem, seed_all, setup_process
from workers.deepspeed_start import skip_muon, skip_shm_op
from workers.lora import adapter_view, apply_lora, full_view, merged_view
from workers.policy import PolicyWithHead
from workers.weight_sync import Bucket, Digest, SyncGroup, TensorMeta, listen, plan_buckets

DS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # DeepSpeed's own default for its group


# learner.optimizer: (parameters, LearnerSettings) -> torch optimizer. SGD without momentum moves
# the weights by exactly -lr * gradient, so tests can see the gradient itself (AdamW ignores its scale).
OPTIMIZERS = {
    "adamw": lambda params, s: torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay),
    "sgd": lambda params, s: torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay),
}


def _dense(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter packed per-token values [M] into [B, T] at mask (differentiable)."""
    return torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device).masked_scatter(
        mask.bool(), packed)


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, model_path: str, settings: LearnerSettings):
        self.rank, self.world_size, self.settings = rank, world_size, settings
        self.device = setup_process(settings.torch_threads, settings.seed + 1000 * rank)
        self.nonfinite_at: dict[str, tuple] = {"loss": (), "grad": ()}  # testing aid: arm_nonfinite
        self.engine = None
        self.grad_norm: float | None = None  # of the last step, where DeepSpeed does not report it
        self.sync: SyncGroup | None = None
        self.model_path = model_path
        self.version = 0

    # ---- set-up -------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0: where DeepSpeed's process group meets; its port is bound and held from now on."""
        self._store = listen(self.world_size, DS_GROUP_TIMEOUT.total_seconds())
        return _node_ip(), self._store.port

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join DeepSpeed's group (NCCL on GPU, gloo on CPU) through rank 0's store; DeepSpeed
        then takes the initialised torch.distributed group as its own."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0" if self.device.type == "cpu" else str(self.device.index))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "gloo":
            skip_shm_op()
        skip_muon()
        store = self._store if self.rank == 0 else dist.TCPStore(
            master_addr, master_port, self.world_size, False, timeout=DS_GROUP_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=DS_GROUP_TIMEOUT)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=DS_GROUP_TIMEOUT)

    def build(self) -> dict:
        s = self.settings
        policy = load_causal_lm(self.model_path, s.dtype, self.device,
                                attn_implementation=s.attn_implementation)
        problem = output_head_problem(policy)
        if problem:
            raise ConfigError(f"model.path: {problem}")
        if s.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        ref_head = None
        if s.ref_transport == "hidden":  # the reference model is the starting policy
            ref_head = policy.get_output_embeddings().weight.detach().clone()
        if self.lora:
            if s.gradient_checkpointing:  # the frozen embeddings' output must carry grad
                policy.enable_input_require_grads()
            policy = apply_lora(policy, s.lora)
        module = PolicyWithHead(policy, ref_head, s.temperature, packed=s.packing == "on")
        trainable = [p for p in module.policy.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS[s.optimizer](trainable, s)
        warmup = max(1, s.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        ds_config = {
            "train_micro_batch_size_per_gpu": s.micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": {"stage": s.zero_stage},
            "bf16": {"enabled": s.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        if s.zero_stage == 3:
            deepspeed.zero.register_external_parameter(self.engine.module, module.head_weight())
        self.engine.eval()  # update() switches to training mode for its own duration
        self.views = self._sync_views()
        return {"params": sum(p.numel() for p in module.policy.parameters()),
                "trainable": sum(p.numel() for p in trainable)}

    def reset(self, settings: LearnerSettings) -> dict:
        """Back to the state a fresh start gives, with these settings (the next run on the same
        processes, system/actors.py): generators seeded as at start, the engine rebuilt from the
        model (weights, optimizer, schedule), policy version 0. The process groups stay."""
        self.settings = settings
        self.engine = self.shard = self.views = None
        self.nonfinite_at = {"loss": (), "grad": ()}
        gc.collect()
        seed_all(settings.seed + 1000 * self.rank)
        self.version, self.grad_norm = 0, None
        return self.build()

    @property
    def lora(self) -> bool:
        return self.settings.lora_rank > 0

    def _sync_views(self) -> dict:
        """{"held": the policy as rollout workers hold it, "sent": what a sync sends} (workers/lora.py)."""
        policy = self.engine.module.policy
        if not self.lora:
            return {"held": full_view(policy), "sent": full_view(policy)}
        held = merged_view(policy)
        return {"held": held, "sent": adapter_view(policy) if self.settings.sync_mode == "adapters" else held}

    # ---- one training step --------------------------------------------------------------------
    def prepare(self, shard: dict, ref_rows: torch.Tensor, plan: list | None = None) -> dict:
        """Keep the shard and its micro-batch plan; pi_old and pi_ref log-probs of its sampled
        tokens, and their per-token k1 = log pi_old - log pi_ref [B, T] (the driver folds it into
        the advantages in `reward` mode).

        plan: per minibatch, its micro-batches as positions in the shard
        (system/data/batch.split_for_learners); None: the shard's rows cut into cfg['minibatches']
        contiguous minibatches, one micro-batch each.

        pi_old (algo.pi_old, system/algo/off_policy.py): `sampler` takes the sampler's own log-probs
        when the shard carries them (a sample drawn ahead, by an older policy) and spends no forward
        pass on it; otherwise, and for `proximal`, it is the current policy's, computed here. With
        `proximal` and the sampler's log-probs, the rollout correction's weight and the mismatch
        statistics come from the two. Both keep the model's dtype (float64 stays float64)."""
        s, mask = self.settings, shard["loss_mask"]
        n = mask.shape[0]
        self.plan = plan or [[list(range(i * (n // s.minibatches), (i + 1) * (n // s.minibatches)))]
                             for i in range(s.minibatches)]
        tokens = shard["input_ids"][:, 1:][mask.bool()]
        counts = mask.sum(-1).long().tolist()
        module, chunk, dev = self.engine.module, s.chunk_size, self.device
        self.engine.eval()  # pi_old, pi_prox and pi_ref without dropout
        sampler_logp = shard["behavior_logp"] * mask if "behavior_logp" in shard else None  # [B, T]
        proximal = s.pi_old == "proximal" or sampler_logp is None
        # every micro-batch, stand-ins too: under ZeRO-3 each forward gathers with the other ranks
        micro = [mb for minibatch in self._micro_batches(shard) for mb in minibatch]
        inputs = lambda mb: (mb["input_ids"].to(dev), mb["attention_mask"].to(dev),  # noqa: E731
                             mb["loss_mask"].to(dev))
        if ref_rows is None:  # reference.source=adapters_off: pi_ref is the base, adapters disabled
            pieces = [(mb["rows"], module.base_hidden_at(*inputs(mb)).cpu()) for mb in micro]
            ref_rows = in_row_order([p for p, mb in zip(pieces, micro) if not mb["stand_in"]], counts)
        with torch.no_grad():
            # the backbone first, the head after: a tied head's weight is the embedding's, and
            # under ZeRO-3 the embedding's forward re-partitions it on exit, inside any gather
            hidden = [module.hidden_at(*inputs(mb)) for mb in micro] if proximal else []
            with _gathered([module.head_weight()], s.zero_stage):
                olds = [(mb["rows"], module.logprobs(h, mb["tokens"].to(dev), chunk).cpu())
                        for h, mb in zip(hidden, micro) if not mb["stand_in"]]
                ref_logp = module.ref_logprobs(ref_rows.to(dev), tokens.to(dev), chunk)
        old_logp = _dense(in_row_order(olds, counts), mask) if proximal else sampler_logp  # [B, T]
        ref_logp = _dense(ref_logp.cpu(), mask)  # [B, T]
        self.shard = dict(shard, old_logp=old_logp, ref_logp=ref_logp, ref_rows=ref_rows.cpu())
        out = {"k1": (old_logp - ref_logp) * mask, "tokens": int(mask.sum())}
        if proximal and sampler_logp is not None:
            weight, stats = rollout_correction(old_logp, sampler_logp, mask, s.rollout_correction,
                                               s.correction)
            self.shard["pg_weight"] = weight  # [B, T]
            out["mismatch"] = {**{k: float(v) for k, v in stats.items()}, "tokens": out["tokens"]}
        return out

    def _micro_batches(self, shard: dict) -> list[list[dict]]:
        """The shard's micro-batches, minibatch by minibatch, as self.plan says. Each is a dict of
        its rows' tensors, trimmed to its own longest row (the padding beyond is never computed),
        with its sampled tokens [m], its reference rows, `rows` (positions in the shard) and
        `stand_in`: an empty micro-batch of the plan (this rank has fewer rows than another has
        micro-batches), run on a row of the minibatch with its loss times 0 so that the ranks'
        forward and backward passes stay in step."""
        out = []
        for minibatch in self.plan:
            first = next(r for mb in minibatch for r in mb)
            out.append([dict(shard_rows(shard, rows or [first]), rows=rows, stand_in=not rows)
                        for rows in minibatch])
        return out

    def update(self, advantages: torch.Tensor, normalizers: list[float],
               kl_baseline: torch.Tensor | None = None) -> dict:
        """mu epochs x minibatches of clipped GRPO with the configured KL mode; each minibatch is
        one optimizer step over its micro-batches (gradient accumulation).

        advantages: [B] or [B, T] (per token in `reward` mode); kl_baseline: [B, T] the baseline
        of full_seq's KL-to-go (system/algo/kl_seq.py), or None. Returns {"steps": one dict of
        statistics per optimizer step, this rank's share (system.metrics.reduce_learner_steps
        combines the ranks'), "skipped": updates skipped for NaN/inf}."""
        shard = dict(self.shard, advantages=advantages)
        if kl_baseline is not None:
            shard["kl_baseline"] = kl_baseline
        steps, skipped = [], 0
        # Hugging Face layers checkpoint activations only in training mode, and DeepSpeed sets
        # the mode only through engine.train(): without it gradient checkpointing is silently off
        self.engine.train()
        try:
            for _ in range(self.settings.epochs):
                for i, micro in enumerate(self._micro_batches(shard)):
                    stats, applied = self._optimizer_step(micro, normalizers[i], first=not steps)
                    skipped += not applied
                    steps.append(stats)
        finally:
            self.engine.eval()
        self.version += 1
        return {"steps": steps, "skipped": skipped}

    def _optimizer_step(self, micro: list[dict], normalizer: float, first: bool) -> tuple[dict, bool]:
        """One optimizer step over this rank's micro-batches of a minibatch: forward and backward
        of each in turn, the gradients accumulating (DeepSpeed reduces them over the ranks at the
        last one), then the step. Every micro-batch's loss carries the whole minibatch's
        normalizer, so they add up to the minibatch's loss however the rows were cut. Returns this
        rank's statistics (its micro-batches' combined, system.metrics.combine_pieces) and
        whether the step was applied."""
        pieces, applied = [], True
        for i, mb in enumerate(micro):
            loss, logp_p, stats = self._minibatch_loss(mb, normalizer, first)
            loss = self._inject_nonfinite(loss, logp_p)
            if mb["stand_in"]:
                loss = loss * 0.0
            else:
                pieces.append(dict(stats, loss=float(loss.detach())))
            if not self._backward(loss, last=i == len(micro) - 1, accumulated=i > 0):
                applied = False
                break
        if applied or i > 0:  # after a failed micro-batch the step discards the poisoned gradients
            applied = self._step() and applied
        stats = combine_pieces(pieces)
        norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(norm if norm is not None else self.grad_norm or 0.0)
        return stats, applied

    def _minibatch_loss(self, mb: dict, normalizer: float, first: bool):
        """The loss of one micro-batch on this rank (its share under the whole minibatch's
        normalizer), the packed log-probs [M], and its statistics (floats)."""
        s = self.settings
        dev = {k: v.to(self.device) for k, v in mb.items() if torch.is_tensor(v)}
        logp_p, kl_p, ent_p = self.engine(dev["input_ids"], dev["attention_mask"],
                                          dev["loss_mask"], dev["ref_rows"], s.chunk_size)
        mask = dev["loss_mask"].float()
        logp, full_kl = _dense(logp_p, mask), _dense(kl_p, mask)  # [B, T]
        kl = loss_kl(s.kl, logp=logp, ref_logp=dev["ref_logp"], old_logp=dev["old_logp"],
                     full_kl=full_kl)
        seq_metrics = {}
        if s.kl.sequence:  # the KL-to-go score term: the gradient of the sequence KL
            kl, seq_metrics = seq_kl_term(
                full_kl, logp, dev["old_logp"], mask, baseline=dev.get("kl_baseline"),
                weighting=s.kl_seq_weight, cap=s.kl_prefix_cap, pg_weight=dev.get("pg_weight"),
                sampler_logp=dev["behavior_logp"] * mask if "behavior_logp" in dev else None)
        loss, metrics = grpo_loss(
            logp, dev["old_logp"], dev["advantages"], mask, kl,
            clip_low=s.clip_low, clip_high=s.clip_high, dual_clip=s.dual_clip, kl_coef=s.kl_coef,
            aggregation=s.aggregation, normalizer=normalizer, max_len=s.max_len, pg_weight=dev.get("pg_weight"))
        with torch.no_grad():
            n_tok = mask.sum().clamp(min=1)
            k3 = sampled_kl(logp, dev["ref_logp"], "k3")
            stats = {**metrics, **seq_metrics, "kl_full": (full_kl * mask).sum() / n_tok,
                     "kl_seq": sequence_kl(full_kl, mask).mean(), "sequences": mask.shape[0],
                     "kl_k3": (k3 * mask).sum() / n_tok,
                     "entropy": _dense(ent_p.detach(), mask).sum() / n_tok}
            if first:  # before any optimizer step pi_theta = pi_old, so this is how far the
                # sampler's policy was from it, per token (0 when pi_old is computed here)
                gap = (logp - dev["behavior_logp"]).abs() if "behavior_logp" in mb else torch.zeros_like(logp)
                stats["behavior_logp_gap"] = (gap * mask).sum() / n_tok
        return loss, logp_p, {k: float(v) for k, v in stats.items()}

    def arm_nonfinite(self, loss_at: list, grad_at: list) -> None:
        """Testing aid (faults.nan_loss_at / nan_grad_at, armed by system/actors.py): the training
        steps whose loss is made NaN, and those with a finite loss but NaN gradients."""
        self.nonfinite_at = {"loss": tuple(loss_at), "grad": tuple(grad_at)}

    def _inject_nonfinite(self, loss: torch.Tensor, logp_p: torch.Tensor) -> torch.Tensor:
        """Testing aid (arm_nonfinite): at the armed training steps make the loss NaN, or keep it
        finite with NaN gradients (sqrt'(0) = inf, times 0)."""
        step = self.version + 1
        if step in self.nonfinite_at["loss"]:
            return loss * float("nan")
        if step in self.nonfinite_at["grad"]:
            return loss + 0 * torch.sqrt(logp_p.sum() * 0)
        return loss

    def _backward(self, loss: torch.Tensor, last: bool, accumulated: bool) -> bool:
        """Back-propagate one micro-batch's loss; DeepSpeed reduces the accumulated gradients over
        the ranks at the last one (the accumulation boundary). Returns False, on every rank alike,
        when the loss is not finite on some rank: then nothing is back-propagated, or, where
        gradients of earlier micro-batches have accumulated, NaN is (at the boundary), so that
        the step that follows is skipped and clears them (ZeRO's own check, or _step's).

        The loss is checked here on every ZeRO stage; the gradients in _step."""
        finite = _all_ranks(torch.isfinite(loss.detach()).all(), self.device)
        if not finite and not accumulated:
            return False
        self.engine.set_gradient_accumulation_boundary(last or not finite)
        # DeepSpeed averages gradients over ranks; the normalizer is the whole minibatch's
        self.engine.backward((loss if finite else loss * float("nan")) * self.world_size)
        return finite

    def _step(self) -> bool:
        """The optimizer step, unless the gradients are not finite on some rank: then every rank
        skips it (the ranks stay in step) and this returns False. ZeRO-1/2/3 and the bf16
        optimizer check their own gradient norm and skip the step on NaN/inf
        (engine.skipped_steps counts it); a plain torch optimizer (ZeRO-0, fp32) has no such
        check, so it is done here."""
        self.grad_norm = None
        if not hasattr(self.engine.optimizer, "overflow"):
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            # DeepSpeed reports no norm for a plain torch optimizer; the gradients are already
            # averaged over the ranks here, so this is the whole minibatch's
            self.grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
            if not _all_ranks(finite, self.device):
                self.engine.optimizer.zero_grad(set_to_none=True)
                return False
        before = self.engine.skipped_steps
        self.engine.step()
        return self.engine.skipped_steps == before

    def pid(self) -> int:
        """This process's id (tests kill it to check that the run stops clearly)."""
        return os.getpid()

    # ---- checkpoints (DeepSpeed's own format: model, optimizer and scheduler, per rank) -------
    # with LoRA the frozen base weights are left out: they are the model directory's
    def save_checkpoint(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="state", client_state={"version": self.version},
                                    exclude_frozen_parameters=self.lora)

    def load_checkpoint(self, directory: str) -> None:
        path, client = self.engine.load_checkpoint(directory, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=not self.lora)
        if path is None:
            raise RuntimeError(f"learner rank {self.rank}: no DeepSpeed checkpoint in {directory}")
        self.version = client["version"]

    # ---- weights out --------------------------------------------------------------------------
    def _each_gathered(self, view: dict):
        """(name, entry) of a view, each entry's parameters gathered while it is in hand (ZeRO-3:
        every rank must iterate)."""
        for name, entry in view.items():
            with _gathered(list(entry.params), self.settings.zero_stage):
                yield name, entry

    def weight_buckets(self, bucket_mb: float) -> list[Bucket]:
        metas = [TensorMeta(n, tuple(_full_shape(e.params[0])), e.params[0].dtype)
                 for n, e in self.views["sent"].items()]
        return plan_buckets(metas, int(bucket_mb * 2**20))

    def open_weight_sync(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: where the weight-sync group meets; its port is bound and held from now on."""
        self._sync_store = listen(world_size, timeout_s)
        return _node_ip(), self._sync_store.port

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str,
                         timeout_s: float) -> bool:
        if self.rank == 0:
            self.sync = SyncGroup(host, port, 0, world_size, backend, timeout_s, store=self._sync_store)
        return True

    def send_weights(self, buckets: list[Bucket]) -> list[float] | None:
        """Broadcast the policy in buckets (rank 0); returns the checksum of the weights the rollout
        workers must then hold (with adapter-only sync, of the merged weights, not of what was
        sent: a receiver that did not merge is caught). All ranks must call."""
        sent, held = self.views["sent"], self.views["held"]
        digest = Digest()

        def tensors(bucket: Bucket):
            ts = [sent[m.name].make() for m in bucket.tensors]
            if sent is held:
                digest.add(zip(bucket.tensors, ts))
            return ts

        with torch.no_grad():
            if self.settings.zero_stage == 3:  # gather one bucket at a time, every rank joins
                for bucket in buckets:
                    with _gathered([p for m in bucket.tensors for p in sent[m.name].params], 3):
                        if self.rank == 0:
                            self.sync.send([bucket], tensors)
            elif self.rank == 0:  # one call: packing overlaps the wire; ZeRO-1/2's flat buffer needs no packing
                self.sync.send(buckets, tensors)
            if sent is not held:
                digest.add((n, e.make()) for n, e in self._each_gathered(held))
        return digest.value if self.rank == 0 else None

    def weights(self) -> dict | None:
        """The policy as the rollout workers hold it (rank 0; None on the others)."""
        with torch.no_grad():
            out = {n: e.make().cpu().clone() for n, e in self._each_gathered(self.views["held"])}
        return out if self.rank == 0 else None

    def save_pretrained(self, path: str, tokenizer_path: str) -> None:
        """A Hugging Face directory: the policy, or with LoRA the adapters (peft's format) and,
        with learner.lora.save_merged, the merged model in path/merged."""
        if self.lora and self.settings.lora["save_merged"]:
            merged = self.weights()
            if self.rank == 0:
                _save_merged(merged, os.path.join(path, "merged"), self.model_path, self.settings.dtype)
        named = list(self.engine.module.policy.named_parameters())
        with _gathered([p for _, p in named], self.settings.zero_stage):
            if self.rank == 0:
                from transformers import AutoTokenizer

                self.engine.module.policy.save_pretrained(path)
                AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)


def _save_merged(weights: dict, path: str, model_path: str, dtype: str) -> None:
    """The base model with the merged weights loaded, saved with its tokenizer."""
    from transformers import AutoTokenizer

    model = load_causal_lm(model_path, dtype, torch.device("cpu"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"merged weights do not fit the base model: missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(path)


def _all_ranks(ok, device: torch.device) -> bool:
    """True only if `ok` holds on every rank of DeepSpeed's group (the default one here)."""
    flag = torch.tensor([1.0 if bool(ok) else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _full_shape(p: torch.Tensor):
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape in ds_shape


def _gathered(params, zero_stage: int):
    """Under ZeRO-3 gather full parameters for reading; otherwise they are already whole."""
    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
