"""The vLLM rollout backend (GPU). Every vLLM call of the project lives in this module.

Written against vLLM 0.25 (the `gpu` extra's pin): an offline `LLM` engine whose GPU worker gets
`SyncExtension` mixed in (`worker_extension_cls`), so the weight-sync process group and the weight
loading run inside the process that holds the model, reached with `LLM.collective_rpc`.
Supports tensor_parallel_size=1 per engine (one sync rank per engine); config validation says so.
"""

from __future__ import annotations

import torch

from workers.weight_sync import Bucket, SyncGroup, checksum


class SyncExtension:
    """Mixed into vLLM's GPU worker: joins the sync group, receives and loads broadcasts."""

    def init_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        self._sync = SyncGroup(host, port, rank, world_size, backend)
        return True

    def receive_weights(self, buckets: list[Bucket]) -> list[float]:
        model = self.model_runner.model
        for name, tensor in self._sync.receive(buckets):
            model.load_weights(weights=[(name, tensor)])
        torch.cuda.synchronize()
        return checksum(self._unique_named_parameters())

    def named_weights(self) -> list:
        return [(n, p.detach().cpu()) for n, p in self._unique_named_parameters()]

    def _unique_named_parameters(self):
        seen, out = set(), []
        for name, p in self.model_runner.model.named_parameters():
            if p.data_ptr() not in seen:  # tied embeddings appear once, as on the learner
                seen.add(p.data_ptr())
                out.append((name, p))
        return out


class VLLMBackend:
    def __init__(self, model_path: str, dtype: str, seed: int, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1):
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
                       worker_extension_cls="workers.vllm_engine.SyncExtension")
        self.eos_id = self.llm.get_tokenizer().eos_token_id

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, greedy: bool, want_logprobs: bool):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens,
                                logprobs=0 if want_logprobs else None,
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

    def init_weight_sync(self, host, port, rank, world_size, backend) -> bool:
        return all(self.llm.collective_rpc("init_weight_sync",
                                           args=(host, port, rank, world_size, backend)))

    def receive_weights(self, buckets: list[Bucket]) -> list[float]:
        out = self.llm.collective_rpc("receive_weights", args=(buckets,))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return out[0]

    def named_weights(self):
        return self.llm.collective_rpc("named_weights")[0]
