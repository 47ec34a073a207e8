"""The GRPO loop on Ray: prompts -> rollouts -> rewards -> reference -> learner -> weight sync.

One step (`train_step`):
1. take B prompts; rollout workers sample G responses each from pi_old (tagged with its version);
2. score them (reward pool), build the padded batch;
3. reference workers return final hidden states (or logits) at the response positions (launched
   with step 1: each starts as soon as the sample exists, without a round trip through the driver;
   with LoRA and reference.source=adapters_off there are no reference workers: the learners run
   the base model, adapters disabled, themselves);
4. learners compute pi_old / pi_ref log-probs, the driver turns rewards into group advantages
   (KL folded into the reward first in `reward` mode), learners run mu epochs of minibatches;
5. learner rank 0 broadcasts the new weights; rollout workers load them and the checksums match.
With trainer.rollout_ahead=k, steps 1 and 3 of steps s+1 .. s+k are launched before step 4 of step s
(system/inflight.py: each sample tagged with the version that draws it, learned at most k versions
later), so sampling and the reference forward run during the learners' update; algo.pi_old says
which policy the ratio divides by (system/algo/off_policy.py).
Steps, syncs and evaluations go through system/faults.py, which recovers from a rollout/reference
worker restart (the step is redone) and stops the run clearly on what cannot be survived.
The design, with the reasons: docs/design.md (section 3 for this loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import ray
import torch
from ray.exceptions import RayActorError

from system import checkpoint
from system.actor_group import ActorGroup, placement_line
from system.algo.advantages import group_advantages
from system.algo.kl import get_kl_mode, kl_in_reward
from system.algo.kl_seq import group_kl_baseline
from system.config import ConfigError, lora_sync_mode, uses_sampler_logprobs
from system.data.batch import build_batch, split_for_learners, split_packed
from system.data.prompts import PromptSampler, PromptSets
from system.faults import ChecksumMismatch, FaultHandler, RunStopped
from system.inflight import InFlight, InFlightQueue
from system.metrics import reduce_learner_steps


def quiet_third_party(cfg) -> dict:
    """Environment that keeps third-party notices off the console, where they repeated once per
    process: DeepSpeed's "Setting accelerator to CPU" (it is told instead, with learners on CPU) and
    torch's deprecation of all_gather_into_tensor, which DeepSpeed's ZeRO calls every step."""
    env = {"PYTHONWARNINGS": "ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning"}
    if cfg.learner.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


class Phases:
    """Seconds per phase of one step (or of start-up), in the order the phases first ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """e.g. `ray.init 6.1s, learner build 3.0s`."""
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items())


PENDING = "pending_sample.pt"  # a checkpoint's rollout_ahead samples, drawn but not yet learned from


def _chunks(items: list, n: int) -> list[list]:
    size = math.ceil(len(items) / n)
    return [items[i * size:(i + 1) * size] for i in range(n)]


class Trainer:
    def __init__(self, cfg, model_path: str, tokenizer, prompts: PromptSets, run_dir: str):
        self.cfg, self.model_path, self.tokenizer, self.prompts = cfg, model_path, tokenizer, prompts
        self.run_dir = run_dir
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sampler = PromptSampler(prompts.train, cfg.data.seed)
        self.kl_mode = get_kl_mode(cfg.algo.kl.mode)
        self.version = 0
        self.inflight = InFlightQueue(cfg.trainer.rollout_ahead)  # samples of the next steps
        self.faults = FaultHandler(self)
        self.start_eval = None  # the start-of-run evaluation, once known (checkpoints carry it)

    # ---- actors -----------------------------------------------------------------------------
    def start_actors(self) -> None:
        """Start every actor and wire them up; self.startup holds the driver's seconds per phase
        (they follow one another, so they add up to the time this takes).

        The learners start first: theirs is the longest path (imports, process group, model load,
        DeepSpeed engine), and the first actors get the worker processes Ray started with the
        cluster (on 2 CPU cores start-up is CPU-bound and the order made no measurable difference:
        tests/benchmarks/startup.py). The rollout and reference workers load their models in the
        meantime, so the driver waits for them only if they are still loading once the learners
        are built."""
        c = self.cfg
        phase = self.startup = Phases()
        # no progress bars from the workers (loading and saving weights): their output would
        # interleave with the step lines, and arrive after the summary
        env = {"OMP_NUM_THREADS": str(c.ray.torch_threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", **quiet_third_party(c)}
        threads = c.ray.torch_threads
        n = c.learner.num_ranks
        with phase("create actors"):
            self.learners = ActorGroup(
                "learner", "workers.learner:LearnerWorker", n, c.learner.num_cpus, c.learner.num_gpus,
                lambda r: ((r, n, self.model_path, self._learner_cfg()), {}), env,
                resources=c.learner.resources)
            self.rollout = ActorGroup(
                "rollout", "workers.rollout:RolloutWorker", c.rollout.num_workers, c.rollout.num_cpus,
                c.rollout.num_gpus, self._rollout_args, env, max_restarts=c.faults.max_actor_restarts,
                resources=c.rollout.resources)
            self.reference = ActorGroup(  # empty with reference.source=adapters_off: the learners do it
                "reference", "workers.reference:ReferenceWorker",
                0 if c.reference.source == "adapters_off" else c.reference.num_workers,
                c.reference.num_cpus, c.reference.num_gpus,
                lambda r: ((self.model_path, c.model.dtype, c.reference.transport, threads, c.seed),
                           {"micro_batch": c.reference.micro_batch}), env,
                max_restarts=c.faults.max_actor_restarts, resources=c.reference.resources)
        with phase("learner processes + imports + process group"):
            self.learners.init_collective()
        with phase("learner build"):
            try:
                self.learners.call("build")
            except ConfigError as err:  # a model the learner refuses: Ray re-raises it as a subclass
                raise ConfigError(str(getattr(err, "cause", err))) from None
        with phase("rollout/reference still loading"):
            self.faults.record_pids()
        with phase("sync group"):
            self._init_weight_sync()
        print(f"[placement] {placement_line(self.rollout, self.reference, self.learners)}", flush=True)

    def stop_actors(self) -> None:
        for name in ("rollout", "reference", "learners"):
            group = getattr(self, name, None)
            if group is not None:
                group.shutdown()

    def _vllm_kwargs(self) -> dict:
        r = self.cfg.rollout
        if r.backend != "vllm":
            return {}
        eager = r.enforce_eager if r.enforce_eager is not None else r.num_gpus == 0
        return {"gpu_memory_utilization": r.gpu_memory_utilization,
                "tensor_parallel_size": r.tensor_parallel_size, "kv_cache_gb": r.kv_cache_gb,
                "enforce_eager": eager, "max_model_len": r.max_model_len, "head_dtype": r.head_dtype}

    def _rollout_args(self, rank: int) -> tuple[tuple, dict]:
        c = self.cfg
        corrupt = c.faults.corrupt_sync_at if rank == 0 else []  # a testing aid: {version: attempts}
        return ((self.model_path, c.rollout.backend, c.model.dtype, c.ray.torch_threads, c.seed + 10 * rank),
                {"vllm_kwargs": self._vllm_kwargs(), "corrupt_sync": {v: corrupt.count(v) for v in corrupt}})

    def _learner_cfg(self) -> dict:
        c, lr = self.cfg, self.cfg.learner
        rows = c.trainer.prompts_per_step * c.rollout.group_size
        return {"torch_threads": c.ray.torch_threads, "seed": c.seed, "dtype": c.model.dtype,
                "gradient_checkpointing": lr.gradient_checkpointing,
                "ref_transport": "hidden" if c.reference.source == "adapters_off" else c.reference.transport,
                "temperature": c.rollout.temperature, "lora": dataclasses.asdict(lr.lora),
                "sync_mode": lora_sync_mode(c),
                "optimizer": lr.optimizer, "lr": lr.lr, "betas": list(lr.betas),
                "weight_decay": lr.weight_decay, "warmup_steps": lr.warmup_steps,
                "micro_batch": rows // (lr.num_ranks * lr.minibatches), "grad_clip": lr.grad_clip,
                "zero_stage": lr.zero_stage, "chunk_size": lr.chunk_size,
                "minibatches": lr.minibatches, "epochs": lr.epochs, "kl_mode": c.algo.kl.mode,
                "pi_old": c.algo.pi_old, "rollout_correction": c.algo.rollout_correction,
                "tis_cap": c.algo.tis_cap, "mis_bounds": list(c.algo.mis_bounds),
                "mis_level": c.algo.mis_level,
                "kl_coef": c.algo.kl.coef, "kl_seq_weight": c.algo.kl.seq_weight,
                "kl_prefix_cap": c.algo.kl.prefix_cap, "clip_low": c.algo.clip_low,
                "clip_high": c.algo.clip_high, "dual_clip": c.algo.dual_clip,
                "aggregation": c.algo.aggregation, "max_len": c.rollout.max_new_tokens,
                "nan_loss_at": list(c.faults.nan_loss_at), "nan_grad_at": list(c.faults.nan_grad_at)}

    def _init_weight_sync(self) -> None:
        s = self.cfg.sync  # backend: made concrete when the config loaded
        world = 1 + len(self.rollout)
        # learner rank 0 holds the group's rendezvous port open from the moment it names it
        host, port = ray.get(self.learners.actors[0].open_weight_sync.remote(world, s.timeout_s))
        refs = self.learners.call_async("init_weight_sync", host, port, world, s.backend, s.timeout_s)
        refs += self.rollout.call_each_async("init_weight_sync", [
            (host, port, 1 + i, world, s.backend, s.timeout_s) for i in range(len(self.rollout))])
        ray.get(refs)
        self.buckets = ray.get(self.learners.actors[0].weight_buckets.remote(self.cfg.sync.bucket_mb))
        self.sync_bytes = sum(b.nbytes for b in self.buckets)  # per rollout worker and sync

    def sync_weights(self) -> None:
        """One broadcast from learner rank 0 to every rollout worker; checksums must agree."""
        sent = self.learners.call_async("send_weights", self.buckets)
        got = self.rollout.call_async("receive_weights", self.buckets, self.version)
        digest, received = ray.get(sent)[0], ray.get(got)
        for i, d in enumerate(received):
            if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(digest, d)):
                raise ChecksumMismatch(f"weight sync: rollout worker {i} checksum {d} != learner "
                                       f"{digest} (policy version {self.version})")
        self.weight_norm = math.sqrt(digest[1])

    # ---- phases -----------------------------------------------------------------------------
    def launch_generate(self, prompt_ids: list[list[int]], n: int, *, seed: int,
                        greedy: bool = False, max_new_tokens: int | None = None,
                        want_logprobs: bool = False) -> tuple[list, int]:
        """Start sampling on every rollout worker; returns (refs, the version they must report)."""
        r = self.cfg.rollout
        parts = _chunks(prompt_ids, len(self.rollout))
        kwargs = {"temperature": r.temperature, "top_p": r.top_p, "greedy": greedy,
                  "max_new_tokens": max_new_tokens or r.max_new_tokens,
                  "want_logprobs": want_logprobs}
        refs = [a.generate.remote(p, n, seed=seed + i, **kwargs)
                for i, (a, p) in enumerate(zip(self.rollout.actors, parts)) if p]
        return refs, self.version

    @staticmethod
    def collect(pending: tuple[list, int]) -> tuple[list[list[int]], list | None]:
        refs, version = pending
        responses, logprobs = [], []
        for out in ray.get(refs):
            if out["version"] != version:
                raise RuntimeError(f"rollout sampled with policy version {out['version']}, "
                                   f"expected {version}")
            responses += out["responses"]
            logprobs += out["logprobs"] or []
        return responses, (logprobs or None)

    def generate(self, prompt_ids: list[list[int]], n: int, **kwargs) -> list[list[int]]:
        return self.collect(self.launch_generate(prompt_ids, n, **kwargs))[0]

    def _sample_step(self, step: int) -> InFlight:
        """Take the prompts of `step` and start sampling them and their reference forward."""
        c = self.cfg
        sampler_state = self.sampler.state_dict()
        rows = self.sampler.next(c.trainer.prompts_per_step)
        # a sample drawn ahead (by an older policy), or the proximal objective's weight: keep the
        # sampler's own log-probs
        launched = self.launch_generate([r["prompt_ids"] for r in rows], c.rollout.group_size,
                                        seed=c.seed * 7919 + step, want_logprobs=uses_sampler_logprobs(c))
        return InFlight(step, launched[1], rows, sampler_state, launched,
                        self.launch_reference(rows, launched))

    def next_sample(self, step: int) -> tuple[InFlight, int]:
        """Step `step`'s sample and its staleness; then the samples of the next steps, up to
        trainer.rollout_ahead of them, start (they overlap the rest of this step)."""
        if not self.inflight:
            self.inflight.push(self._sample_step(step))
        item, staleness = self.inflight.take(step, self.version)
        for ahead in self.inflight.to_launch(step, self.cfg.trainer.steps):
            self.inflight.push(self._sample_step(ahead))
        return item, staleness

    def drop_inflight(self) -> None:
        """Forget the samples in flight and rewind the data to before the first of them."""
        self.sampler.load_state_dict(self.inflight.data_position(self.sampler.state_dict()))
        self.inflight.clear()

    def launch_reference(self, rows: list[dict], pending: tuple[list, int]) -> list | None:
        """The reference forward of a sample still being drawn: each reference worker starts on
        its rows as soon as the rollout workers' outputs exist (with rollout_ahead, during the
        learners' update of the step before). Returns refs for reference_rows(), or None
        without reference workers (reference.source=adapters_off)."""
        if not len(self.reference):
            return None
        G = self.cfg.rollout.group_size
        prompts = [r["prompt_ids"] for r in rows for _ in range(G)]
        parts = _chunks(list(range(len(prompts))), len(self.reference))
        return [a.forward_sampled.remote(prompts, self.pad_id, p, *pending[0])
                for a, p in zip(self.reference.actors, parts) if p]

    def reference_rows(self, batch, launched: list | None = None) -> torch.Tensor:
        """pi_ref's rows for the batch: those launch_reference() started, or computed now; None
        when the learners compute them (reference.source=adapters_off)."""
        if not len(self.reference):
            self.last_ref_bytes = 0
            return None
        if launched is None:
            parts = _chunks(list(range(batch.size)), len(self.reference))
            launched = [a.forward.remote(**batch.reference_inputs(torch.tensor(p))) for a, p in
                        zip(self.reference.actors, parts) if p]
        outs = ray.get(launched)
        self.last_ref_bytes = sum(o["bytes"] for o in outs)
        return torch.cat([o["rows"] for o in outs])

    def learn(self, batch, rewards: torch.Tensor, ref_rows: torch.Tensor) -> dict:
        c = self.cfg
        index, normalizers = split_for_learners(batch, c.learner.num_ranks, c.learner.minibatches,
                                                c.algo.aggregation)
        prep = self.learners.call_each("prepare", [
            (batch.rows(i), None if ref_rows is None else split_packed(ref_rows, batch.loss_mask, i))
            for i in index])
        mismatch = reduce_learner_steps([[p["mismatch"]] for p in prep]) if "mismatch" in prep[0] else {}
        adv, adv_metrics = group_advantages(rewards, c.rollout.group_size, c.algo.scale_by_std)
        k1 = torch.zeros(batch.loss_mask.shape, dtype=prep[0]["k1"].dtype)  # [N, L-1]
        for i, p in zip(index, prep):
            k1[i] = p["k1"]
        if not self.kl_mode.in_loss:  # PPO-style: k1 of pi_old as a per-token reward
            adv, kl_metrics = kl_in_reward(adv, k1, batch.loss_mask, c.algo.kl.coef)
            adv_metrics.update(kl_metrics)
        base = None  # full_seq's KL-to-go baseline: from the other responses of each group
        if self.kl_mode.sequence and c.algo.kl.baseline == "group":
            base = group_kl_baseline(k1, batch.loss_mask, c.rollout.group_size)  # [N, L-1]
        outs = self.learners.call_each("update", [(adv[i], normalizers, None if base is None else base[i])
                                                  for i in index])
        learner = reduce_learner_steps([o["steps"] for o in outs])
        learner["updates_skipped"] = outs[0]["skipped"]  # the ranks agree on every skip
        return {**learner, **mismatch, **{k: float(v) for k, v in adv_metrics.items()}}

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        c, G = self.cfg, self.cfg.rollout.group_size
        phases, t0 = Phases(), time.perf_counter()
        with phases("generate"):
            item, staleness = self.next_sample(step)
            rows = item.rows
            responses, sampler_logp = self.collect(item.launched)
        with phases("reward"):
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            answers = [r["answer"] for r in rows for _ in range(G)]
            scores, reward_metrics = self.rewards.score(texts, answers)
            rewards = torch.tensor(scores, dtype=torch.float32)
        batch = build_batch([r["prompt_ids"] for r in rows for _ in range(G)], responses, self.pad_id,
                            sampler_logp if uses_sampler_logprobs(c) else None)
        with phases("reference"):
            ref_rows = self.reference_rows(batch, item.ref_launched)
        with phases("learn"):
            learn_metrics = self.learn(batch, rewards, ref_rows)
        with phases("sync"):
            self.version += 1
            self.faults.sync()
        step_s = time.perf_counter() - t0
        n_tokens = int(batch.loss_mask.sum())
        eos = self.tokenizer.eos_token_id
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards >= self.full_score).float().mean()),
            **learn_metrics, "kl_gap": learn_metrics["kl_k3"] - learn_metrics["kl_full"],
            "response_len": n_tokens / batch.size,
            "truncated_frac": sum(1 for r in responses if not r or r[-1] != eos) / batch.size,
            "ref_bytes": self.last_ref_bytes, "ref_bytes_per_token": self.last_ref_bytes / max(n_tokens, 1),
            "tokens_per_s": n_tokens / step_s, "step_s": step_s, "policy_version": self.version,
            "staleness": staleness,
            "weight_norm": self.weight_norm, "sync_bytes": self.sync_bytes,
            **{f"time_{k}": v for k, v in phases.seconds.items()},
            **{k: v for k, v in reward_metrics.items() if isinstance(v, (int, float))},
        }

    @property
    def full_score(self) -> float:
        return sum(s.weight for s in self.cfg.reward.functions) - 1e-6

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict:
        e = self.cfg.eval
        rows = self.prompts.heldout[:e.size]
        if not rows:
            return {}
        ids = [r["prompt_ids"] for r in rows]
        max_new = e.max_new_tokens or self.cfg.rollout.max_new_tokens
        greedy = self.generate(ids, 1, seed=0, greedy=True, max_new_tokens=max_new)
        texts = self.tokenizer.batch_decode(greedy, skip_special_tokens=True)
        scores, _ = self.rewards.score(texts, [r["answer"] for r in rows])
        out = {"greedy_accuracy": sum(s >= self.full_score for s in scores) / len(rows)}
        if e.pass_k > 0:
            sampled = self.generate(ids, e.pass_k, seed=1, max_new_tokens=max_new)
            texts = self.tokenizer.batch_decode(sampled, skip_special_tokens=True)
            s, _ = self.rewards.score(texts, [r["answer"] for r in rows for _ in range(e.pass_k)])
            hits = torch.tensor(s).view(len(rows), e.pass_k) >= self.full_score
            out[f"pass@{e.pass_k}"] = float(hits.any(dim=1).float().mean())
        return out

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, logger, progress=None) -> dict:
        """Resume if asked, evaluate, train to cfg.trainer.steps (evaluating every eval.every and
        checkpointing every checkpoint.every), evaluate at the end."""
        c = self.cfg
        done, start = self.maybe_resume(logger)
        self.faults.sync()  # also proves the channel and the checksum before the first sample
        if start is None:
            logger.log(0, self.data_stats(), kind="data")
            start = self.faults.call(self.evaluate, "evaluation")
            logger.log(0, start, kind="eval")
            if start:  # empty without a held-out set (train.py says so at start)
                print(f"[eval] step 0: {start}", flush=True)
        last = self.start_eval = start
        if progress is not None:
            progress.update(done)
        for step in range(done + 1, c.trainer.steps + 1):
            metrics = self.faults.run_step(step)
            logger.log(step, metrics)
            print(logger.console_line(step, c.trainer.steps, metrics), flush=True)
            self.faults.check_nonfinite(step)
            if progress is not None:
                progress.update(1)
            if step == c.trainer.steps or (c.eval.every and step % c.eval.every == 0):
                last = self.faults.call(self.evaluate, f"evaluation at step {step}")
                logger.log(step, last, kind="eval")
                if last:
                    print(f"[eval] step {step}: {last}", flush=True)
            if c.checkpoint.every and step % c.checkpoint.every == 0 and self.faults.healthy:
                self.faults.call(lambda: self.save_checkpoint(step, start), f"checkpoint {step}")
        return {"start": start, "end": last}

    def data_stats(self) -> dict:
        """What loading the prompts kept and skipped (bad rows, prompts too long), for metrics."""
        stats = {k: v for k, v in self.prompts.stats.items() if k != "path" and not k.endswith("_path")}
        return {"train_prompts": len(self.prompts.train), "heldout_prompts": len(self.prompts.heldout),
                **stats}

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, step: int, start_eval: dict) -> str:
        """Write the checkpoint of `step`. If it cannot be written (a full disk, a volume gone),
        its partial files are removed and the run stops with one line; the previous checkpoint
        stays what `latest` names, whole and loadable."""
        t0 = time.perf_counter()
        tmp = checkpoint.begin(self.run_dir, step)
        try:
            path = self._write_checkpoint(tmp, step, start_eval)
        except RayActorError:  # a worker died meanwhile: system/faults.py recovers and retries
            raise
        except Exception as err:  # noqa: BLE001 - any write failure: stop, keeping the last one
            checkpoint.discard(tmp)
            raise RunStopped(f"checkpoint {step} could not be written ({checkpoint.write_problem(tmp, err)}); "
                             f"its partial files were removed and the previous checkpoint is intact. "
                             f"Free space on that volume (or point output_dir at a larger one) and "
                             f"resubmit the same command with trainer.resume=auto to continue from "
                             f"{checkpoint.find_resumable(self.run_dir) or 'the beginning'}") from None
        print(f"[checkpoint] step {step} -> {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
        return path

    def _write_checkpoint(self, tmp: str, step: int, start_eval: dict) -> str:
        self.learners.call("save_checkpoint", os.path.join(tmp, "learner"))
        # with samples in flight, the data position is the one before the first was drawn, and the
        # samples themselves are kept (this waits for the sampler): a resumed run learns from the
        # same responses, drawn by the same older policies, as the uninterrupted run
        state = {"step": step, "version": self.version,
                 "sampler": self.inflight.data_position(self.sampler.state_dict()),
                 "start_eval": start_eval, "seed": self.cfg.seed, "faults": self.faults.state_dict()}
        if self.inflight:
            torch.save([{"step": x.step, "version": x.version, "outputs": ray.get(x.launched[0])}
                        for x in self.inflight], os.path.join(tmp, PENDING))
            state["pending_sample"] = PENDING
        return checkpoint.commit(self.run_dir, tmp, step, state, self.cfg.checkpoint.keep)

    def maybe_resume(self, logger) -> tuple[int, dict | None]:
        """(steps already done, start-of-run eval) from the checkpoint trainer.resume names."""
        mode = self.cfg.trainer.resume
        if mode == "none":
            return 0, None
        path = checkpoint.find_resumable(self.run_dir) if mode == "auto" else mode
        if path is None:
            print("[resume] no checkpoint yet: starting from the beginning", flush=True)
            return 0, None
        problem = checkpoint.damage(path)
        if problem:
            raise RuntimeError(f"trainer.resume: checkpoint {path} cannot be loaded: {problem}")
        state = checkpoint.load_state(path)
        self.learners.call("load_checkpoint", os.path.join(path, "learner"))
        self.version = state["version"]
        self.sampler.load_state_dict(state["sampler"])
        self.faults.load_state_dict(state.get("faults", {}))
        if state.get("pending_sample") and self.cfg.trainer.rollout_ahead:
            self._restore_pending(os.path.join(path, state["pending_sample"]))
        logger.truncate_after(state["step"])
        print(f"[resume] from {path}: step {state['step']}, policy version {self.version}", flush=True)
        return state["step"], state["start_eval"]

    def _restore_pending(self, path: str) -> None:
        """The checkpoint's in-flight samples, as if they had just been collected from the workers."""
        saved = torch.load(path, weights_only=False)
        want = self.cfg.trainer.prompts_per_step * self.cfg.rollout.group_size
        sizes = [sum(len(o["responses"]) for o in s["outputs"]) for s in saved]
        if any(n != want for n in sizes):
            print(f"[resume] the checkpoint's in-flight samples have {sizes} responses, this config "
                  f"wants {want}: sampling them again", flush=True)
            return
        for s in saved[:self.cfg.trainer.rollout_ahead]:  # the rest is drawn again, fresher
            sampler_state = self.sampler.state_dict()
            rows = self.sampler.next(self.cfg.trainer.prompts_per_step)
            refs = [ray.put(o) for o in s["outputs"]]
            self.inflight.push(InFlight(s["step"], s["version"], rows, sampler_state,
                                        (refs, s["version"])))

    def save_policy(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.learners.call("save_pretrained", path, self.model_path)
