"""The actors of a run and the weight sync between them: start, wire up, sync, reset, stop.

`Actors.start()` creates the three groups (learner ranks, rollout workers, reference workers),
joins the learners' DeepSpeed group, builds their engines and the weight-sync group (rank 0 the
learner, ranks 1..R the rollout workers; workers/weight_sync.py). `sync(version)` is one
broadcast, with the checksums compared. The actors can outlive a run: `reset(cfg)` brings them to
the state a fresh start would have (the learners' engines rebuilt from the model: weights,
optimizer, schedule, seeds; the testing aids of the new config armed) for a run whose config
`reusable` accepts, so a sequence of runs pays the start-up once (the tests, the experiments'
grids). The rollout workers get the new run's weights at its first sync, the reference workers
hold no state. docs/design.md (sections 3 and 4) has the whole picture.
"""

from __future__ import annotations

import math
import os

import ray

from system.actor_group import ActorGroup, placement_line
from system.config import ConfigError
from system.faults import ChecksumMismatch, probe
from system.metrics import Phases
from system.settings import LEARNER_PROCESS_FIELDS, learner_settings

_PROBE_S = 60.0  # after a run, an actor that answers nothing in this long is busy: its next call waits


def quiet_third_party(cfg) -> dict:
    """Environment that keeps third-party notices off the console, where they repeated once per
    process: DeepSpeed's "Setting accelerator to CPU" (it is told instead, with learners on CPU) and
    torch's deprecation of all_gather_into_tensor, which DeepSpeed's ZeRO calls every step."""
    env = {"PYTHONWARNINGS": "ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning"}
    if cfg.learner.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _vllm_kwargs(cfg) -> dict:
    r = cfg.rollout
    if r.backend != "vllm":
        return {}
    return {"gpu_memory_utilization": r.gpu_memory_utilization,
            "tensor_parallel_size": r.tensor_parallel_size, "kv_cache_gb": r.kv_cache_gb,
            "enforce_eager": r.enforce_eager, "max_model_len": r.max_model_len, "head_dtype": r.head_dtype}


def _reference_settings(cfg) -> dict:
    """What a reference worker computes with; a reused one takes a new run's (ReferenceWorker.configure)."""
    r = cfg.reference
    return {"transport": r.transport, "max_tokens": r.max_tokens_per_micro_batch, "packed": r.packing == "on"}


def startup_key(cfg, model_path: str) -> tuple:
    """Everything the actors' processes were started with: runs with equal keys can share them."""
    c, settings = cfg, learner_settings(cfg)
    groups = [(getattr(c, role).num_cpus, getattr(c, role).num_gpus, sorted(getattr(c, role).resources.items()))
              for role in ("learner", "rollout", "reference")]
    # the seed reaches the processes only through vLLM's engine (HF generate is seeded per call)
    return (os.path.realpath(model_path), c.seed if c.rollout.backend == "vllm" else None,
            c.ray.torch_threads, c.learner.num_ranks, c.rollout.backend, c.rollout.num_workers,
            sorted(_vllm_kwargs(c).items()), c.reference.source, c.reference.num_workers,
            c.model.attn_implementation, c.sync.backend, repr(groups),
            repr([getattr(settings, k) for k in LEARNER_PROCESS_FIELDS]), sorted(quiet_third_party(c).items()))


class Actors:
    def __init__(self, cfg, model_path: str):
        self.cfg, self.model_path = cfg, model_path
        self.key = startup_key(cfg, model_path)
        self.learners = self.rollout = self.reference = None
        self.buckets, self.sync_bytes, self.weight_norm = [], 0, 0.0
        self.sync_formed_with = None  # (rollout worker pids, sync.timeout_s) of the last sync group
        self.startup = Phases()

    def reusable(self, cfg, model_path: str) -> bool:
        return self.learners is not None and startup_key(cfg, model_path) == self.key

    # ---- start, reset, stop -----------------------------------------------------------------
    def start(self) -> None:
        """Start every actor and wire them up; self.startup holds the seconds per phase (they
        follow one another, so they add up to the time this takes).

        The learners start first: theirs is the longest path (imports, process group, model load,
        DeepSpeed engine), and the first actors get the worker processes Ray started with the
        cluster (on 2 CPU cores start-up is CPU-bound and the order made no measurable difference:
        tests/benchmarks/startup.py). The rollout and reference workers load their models in the
        meantime, so the driver waits for them only if they are still loading once the learners
        are built."""
        c = self.cfg
        phase = self.startup = Phases()
        _count_startup("start")
        with phase("create actors"):
            self.learners = self._learner_group()
            self.rollout = ActorGroup(
                "rollout", "workers.rollout:RolloutWorker", c.rollout.num_workers, c.rollout.num_cpus,
                c.rollout.num_gpus, self._rollout_args, self._env(),
                # Ray restarts a worker whenever its process dies; the driver counts the restarts
                # and stops past faults.max_actor_restarts in a submission (system/faults.py)
                max_restarts=-1, resources=c.rollout.resources)
            self.reference = ActorGroup(  # empty with reference.source=adapters_off: the learners do it
                "reference", "workers.reference:ReferenceWorker",
                0 if c.reference.source == "adapters_off" else c.reference.num_workers,
                c.reference.num_cpus, c.reference.num_gpus, self._reference_args, self._env(),
                max_restarts=-1, resources=c.reference.resources)
        self._join_and_build_learners(phase)
        with phase("rollout/reference still loading"):
            self.pids()
        with phase("sync group"):
            self.init_sync()
        self._arm(c)
        print(f"[placement] {placement_line(self.rollout, self.reference, self.learners)}", flush=True)

    def reset(self, cfg) -> None:
        """Back to the state start() leaves, for a run with this config (`reusable` must accept
        it): first what the last run lost is replaced (repair()); the learners rebuild their engines
        from the model with the new settings and seeds; the reference workers take the new run's
        transport and micro-batches."""
        self.cfg = cfg
        phase = self.startup = Phases()
        if not self.repair(phase):  # new learners are built with cfg already
            with phase("learner rebuild (actors reused)"):
                self.learners.call("reset", learner_settings(cfg))
        self.buckets = ray.get(self.learners.actors[0].weight_buckets.remote(cfg.sync.bucket_mb))
        self.reference.call("configure", **_reference_settings(cfg))
        self._arm(cfg)
        print(f"[placement] {placement_line(self.rollout, self.reference, self.learners)} (reused)",
              flush=True)

    def repair(self, phase: Phases) -> bool:
        """Mend what a run lost: a rollout or reference worker that is dead (Ray restarts one whose
        process dies; one killed for good, or whose constructor failed, stays dead) is replaced, a
        learner group that lost a rank is started anew (DeepSpeed's group cannot take a new
        member), and if a rollout worker is not the process the last sync group was formed with
        (replaced, or restarted by Ray after the run last formed it) every member forms a new one.
        Returns whether the learners are new."""
        replaced, new_learners = [], False
        with phase("check the actors"):
            learners = probe(self.learners.actors, _PROBE_S)
            workers = {name: probe(getattr(self, name).actors, _PROBE_S) for name in ("rollout", "reference")}
        if any(state == "dead" for state, _ in learners):  # a busy one: its next call waits
            _count_startup("learners")
            self.learners.shutdown()
            with phase("create learners"):
                self.learners = self._learner_group()
            self._join_and_build_learners(phase)
            replaced.append(f"the {len(self.learners)} learner ranks")
            new_learners = True
        for name, states in workers.items():
            for rank, (state, _) in enumerate(states):
                if state == "dead":
                    _count_startup("worker")
                    getattr(self, name).replace(rank)
                    replaced.append(f"{name} worker {rank}")
        with phase("workers ready"):
            formed_with = (self.rollout.call("pid"), self.cfg.sync.timeout_s)
        if new_learners or formed_with != self.sync_formed_with:
            with phase("sync group"):
                self.init_sync()
        if replaced:
            print(f"[placement] replaced what the last run lost: {', '.join(replaced)}", flush=True)
        return new_learners

    def _env(self) -> dict:
        # no progress bars from the workers (loading and saving weights): their output would
        # interleave with the step lines, and arrive after the summary
        c = self.cfg
        return {"OMP_NUM_THREADS": str(c.ray.torch_threads), "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", **quiet_third_party(c)}

    def _learner_group(self) -> ActorGroup:
        c, settings = self.cfg, learner_settings(self.cfg)
        n = c.learner.num_ranks
        return ActorGroup("learner", "workers.learner:LearnerWorker", n, c.learner.num_cpus,
                          c.learner.num_gpus, lambda r: ((r, n, self.model_path, settings), {}),
                          self._env(), resources=c.learner.resources)

    def _rollout_args(self, rank: int) -> tuple:
        c = self.cfg
        return ((self.model_path, c.rollout.backend, c.model.dtype, c.ray.torch_threads, c.seed + 10 * rank),
                {"vllm_kwargs": _vllm_kwargs(c)})

    def _reference_args(self, rank: int) -> tuple:
        c = self.cfg
        return ((self.model_path, c.model.dtype, c.ray.torch_threads, c.seed),
                {"attn_implementation": c.model.attn_implementation, **_reference_settings(c)})

    def _join_and_build_learners(self, phase: Phases) -> None:
        with phase("learner processes + imports + process group"):
            self.learners.init_collective()
        with phase("learner build"):
            try:
                self.learners.call("build")
            except ConfigError as err:  # a model the learner refuses: Ray re-raises it as a subclass
                raise ConfigError(str(getattr(err, "cause", err))) from None

    def stop(self) -> None:
        for group in (self.rollout, self.reference, self.learners):
            if group is not None:
                group.shutdown()
        self.learners = self.rollout = self.reference = None

    def _arm(self, cfg) -> None:
        """Testing aids, armed at run time (nothing in real runs): rollout worker 0 loads one weight
        wrong in the first `n` syncs of each version listed n times in faults.corrupt_sync_at; the
        learners make the loss (faults.nan_loss_at) or the gradients (faults.nan_grad_at) of those
        training steps NaN."""
        f = cfg.faults
        refs = self.learners.call_async("arm_nonfinite", list(f.nan_loss_at), list(f.nan_grad_at))
        if len(self.rollout):
            corrupt = list(f.corrupt_sync_at)
            refs.append(self.rollout.actors[0].corrupt_syncs.remote({v: corrupt.count(v) for v in corrupt}))
        ray.get(refs)

    # ---- the weight sync --------------------------------------------------------------------
    def init_sync(self) -> None:
        """A new sync group (at start, and after a rollout worker restarted: a new process cannot
        join the old one), on a port learner rank 0 holds from the moment it names it."""
        s = self.cfg.sync  # backend: made concrete when the config loaded
        world = 1 + len(self.rollout)
        host, port = ray.get(self.learners.actors[0].open_weight_sync.remote(world, s.timeout_s))
        refs = self.learners.call_async("init_weight_sync", host, port, world, s.backend, s.timeout_s)
        refs += self.rollout.call_each_async("init_weight_sync", [
            (host, port, 1 + i, world, s.backend, s.timeout_s) for i in range(len(self.rollout))])
        ray.get(refs)
        self.sync_formed_with = (self.rollout.call("pid"), s.timeout_s)
        self.buckets = ray.get(self.learners.actors[0].weight_buckets.remote(s.bucket_mb))
        self.sync_bytes = sum(b.nbytes for b in self.buckets)  # per rollout worker and sync

    def sync(self, version: int) -> None:
        """One broadcast from learner rank 0 to every rollout worker; checksums must agree."""
        sent = self.learners.call_async("send_weights", self.buckets)
        got = self.rollout.call_async("receive_weights", self.buckets, version)
        digest, received = ray.get(sent)[0], ray.get(got)
        for i, d in enumerate(received):
            if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(digest, d)):
                raise ChecksumMismatch(f"weight sync: rollout worker {i} checksum {d} != learner "
                                       f"{digest} (policy version {version})")
        self.weight_norm = math.sqrt(digest[1])

    # ---- what system/faults.py asks -------------------------------------------------------------
    def pids(self) -> dict[str, list]:
        """The process id of every rollout and reference worker (a new one: restarted)."""
        return {"rollout": self.rollout.call("pid"), "reference": self.reference.call("pid")}

    def groups(self) -> dict[str, ActorGroup]:
        return {"learner": self.learners, "rollout": self.rollout, "reference": self.reference}


class ActorPool:
    """Actors kept from one run to the next in one process (the tests, the experiments' grids).

    take() resets the held actors for a run whose config allows it (Actors.reusable), replacing
    first what the last run lost (a dead or restarted worker, the learner group if a rank died:
    Actors.repair), else stops them and starts new ones. give_back(ended) keeps them after a run
    that ended as runs do (finished, stopped by the driver on a failure, or by Ctrl-C: the actors
    finish what they were asked, then are idle) and stops them after anything else (an error the
    driver did not expect). keep=False (a single run) always stops them."""

    def __init__(self, keep: bool = True):
        self.keep, self.actors = keep, None

    def take(self, cfg, model_path: str) -> Actors:
        reuse = self.actors is not None and self.actors.reusable(cfg, model_path)
        if not reuse:
            self.close()
            self.actors = Actors(cfg, model_path)
        try:
            self.actors.reset(cfg) if reuse else self.actors.start()
        except BaseException:
            self.close()
            raise
        return self.actors

    def give_back(self, ended: bool) -> None:
        if not (self.keep and ended):
            self.close()

    def close(self) -> None:
        if self.actors is not None:
            self.actors.stop()
            self.actors = None


def _count_startup(what: str) -> None:
    """One line per start-up in the file $GRPO_STARTUP_LOG names (the test suite counts them):
    `start` (every actor), `learners` (a new learner group for reused actors) or `worker` (one
    rollout or reference worker replaced)."""
    path = os.environ.get("GRPO_STARTUP_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()}\n")
