"""Weight sync: learner rank 0 broadcasts the policy to every rollout worker, in buckets.

Steps of one sync (driven by one RPC per participant, see system/trainer.py):
1. At start-up every participant joins a process group of its own (rank 0 = learner rank 0,
   ranks 1..R = rollout workers) built from a TCPStore, separate from DeepSpeed's default group:
   gloo on CPU, NCCL on GPU.
2. The learner packs parameters into flat buckets of one dtype (`plan_buckets`) and broadcasts
   each bucket with one collective; the receivers unpack views of the same layout and load them.
3. Both sides compute `checksum` over the named tensors (the receiver over what it loaded), and the
   driver compares them, so weights that silently did not load are caught.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    tensors: tuple  # tuple[TensorMeta, ...], in packing order

    @property
    def numel(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Group tensors into buckets of one dtype, each at most bucket_bytes (or one tensor if larger)."""
    buckets, current, size, dtype = [], [], 0, None
    for m in metas:
        nbytes = _numel(m.shape) * torch.empty((), dtype=m.dtype).element_size()
        if current and (m.dtype != dtype or size + nbytes > bucket_bytes):
            buckets.append(Bucket(dtype, tuple(current)))
            current, size = [], 0
        current.append(m)
        size += nbytes
        dtype = m.dtype
    if current:
        buckets.append(Bucket(dtype, tuple(current)))
    return buckets


def checksum(named: Iterable[tuple[str, torch.Tensor]]) -> list[float]:
    """[sum, sum of squares] in float64 over all tensors; invariant to how tensors are split or fused."""
    total, squares = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for _, t in named:
        t = t.detach().to(torch.float64)
        total += t.sum().cpu()
        squares += (t * t).sum().cpu()
    return [total.item(), squares.item()]


class SyncGroup:
    """A process group of its own between learner rank 0 (rank 0) and the rollout workers."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float = 600.0):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore("weight_sync", store)
        if backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            self.device = torch.device("cpu")
        self._store = store  # the group needs the store alive

    def _broadcast(self, flat: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([flat], opts).wait()
        if self.backend == "nccl":
            torch.cuda.current_stream().synchronize()

    def send(self, buckets: list[Bucket], get_tensors) -> None:
        """Broadcast each bucket. get_tensors(bucket) -> list of full tensors in bucket order."""
        for bucket in buckets:
            tensors = get_tensors(bucket)
            flat = torch.cat([t.detach().reshape(-1).to(self.device, bucket.dtype) for t in tensors])
            self._broadcast(flat)

    def receive(self, buckets: list[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive each bucket and yield (name, tensor) views into it, bucket by bucket."""
        for bucket in buckets:
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for m in bucket.tensors:
                n = _numel(m.shape)
                yield m.name, flat[offset:offset + n].view(m.shape)
                offset += n
