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
worker restart (the step is redone) and stops the run clearly on what cannot be survived. The
actors and the weight sync are system/actors.py's; checkpoints and resuming, system/resume.py's.
The design, with the reasons: docs/design.md (section 3 for this loop).
"""

from __future__ import annotations

import math
import os
import time

import ray
import torch

from system import chaos, resume
from system.algo.advantages import group_advantages
from system.algo.kl import get_kl_mode, kl_in_reward
from system.algo.kl_seq import group_kl_baseline
from system.config import uses_sampler_logprobs
from system.data.batch import build_batch, split_for_learners, split_packed
from system.data.prompts import PromptSampler, PromptSets
from system.faults import FaultHandler
from system.inflight import InFlight, InFlightQueue
from system.metrics import Phases, reduce_learner_steps


def _chunks(items: list, n: int) -> list[list]:
    size = math.ceil(len(items) / n)
    return [items[i * size:(i + 1) * size] for i in range(n)]


class Trainer:
    def __init__(self, cfg, actors, tokenizer, prompts: PromptSets, run_dir: str, rewards):
        """actors: started (system/actors.py), or reset for this run; rewards: the reward pool."""
        self.cfg, self.actors, self.tokenizer, self.prompts = cfg, actors, tokenizer, prompts
        self.run_dir, self.rewards = run_dir, rewards
        self.learners, self.rollout, self.reference = actors.learners, actors.rollout, actors.reference
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sampler = PromptSampler(prompts.train, cfg.data.seed)
        self.kl_mode = get_kl_mode(cfg.algo.kl.mode)
        self.version = 0
        self.inflight = InFlightQueue(cfg.trainer.rollout_ahead)  # samples of the next steps
        self.faults = FaultHandler(actors, cfg.faults, self)
        self.faults.record_pids()
        self.start_eval = None  # the start-of-run evaluation, once known (checkpoints carry it)

    # ---- what system/faults.py asks of the loop ---------------------------------------------
    def data_position(self) -> dict:
        """The prompt sampler's state before the first sample in flight (now, if none is)."""
        return self.inflight.data_position(self.sampler.state_dict())

    def rewind(self, position: dict) -> None:
        """Forget the samples in flight; the prompt data goes back to `position`."""
        self.inflight.clear()
        self.sampler.load_state_dict(position)

    def save_now(self) -> str | None:
        return resume.save_now(self)

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
        split = split_for_learners(batch, c.learner.num_ranks, c.learner.minibatches, c.algo.aggregation,
                                   c.learner.max_tokens_per_micro_batch, c.learner.packing == "on")
        index, normalizers = split.rows, split.normalizers
        prep = self.learners.call_each("prepare", [
            (batch.rows(i), None if ref_rows is None else split_packed(ref_rows, batch.loss_mask, i), plan)
            for i, plan in zip(index, split.plans)])
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
            "weight_norm": self.actors.weight_norm, "sync_bytes": self.actors.sync_bytes,
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
        done, start = resume.resume(self, logger)
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
            chaos.before_step(self, step)  # a no-op outside the chaos run and its test
            metrics = self.faults.run_step(step, self.train_step)
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
                self.faults.call(lambda: resume.save(self, step), f"checkpoint {step}")
        return {"start": start, "end": last}

    def data_stats(self) -> dict:
        """What loading the prompts kept and skipped (bad rows, prompts too long), for metrics."""
        stats = {k: v for k, v in self.prompts.stats.items() if k != "path" and not k.endswith("_path")}
        return {"train_prompts": len(self.prompts.train), "heldout_prompts": len(self.prompts.heldout),
                **stats}

    def save_policy(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.learners.call("save_pretrained", path, self.actors.model_path)
