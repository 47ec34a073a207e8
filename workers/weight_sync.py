"""Weight sync: learner rank 0 broadcasts the policy to every rollout worker, in buckets.

Steps of one sync (driven by one RPC per participant, see system/trainer.py):
1. At start-up every participant joins a process group of its own (rank 0 = learner rank 0,
   ranks 1..R = rollout workers) built from a TCPStore that learner rank 0 opens on a port it
   holds from then on (`listen`), separate from DeepSpeed's default group: gloo on CPU, NCCL
   between roles with GPUs of their own. Every collective has a time limit (sync.timeout_s), on
   NCCL too: a rollout worker lost mid-broadcast fails the sync, and the driver restarts the
   worker and rebuilds the group (system/faults.py), instead of learner rank 0 waiting for NCCL's
   watchdog.
2. The learner packs parameters into flat buckets of one dtype (`plan_buckets`) and broadcasts
   each bucket with one collective; the receivers unpack views of the same layout and load them.
   No copy where the layout allows it: a bucket whose tensors lie adjacent in one storage (the
   learner's under DeepSpeed ZeRO-1/2, the HF rollout backend's after `flatten_parameters`) is
   broadcast in place. Otherwise two bucket buffers, allocated once and reused, let bucket k be
   packed (unpacked) while the other one is on the wire.
3. Both sides compute `checksum` over the named tensors (the receiver over what it loaded), and the
   driver compares them, so weights that silently did not load are caught.
docs/design.md (section 4) has the whole sync, with the reasons.
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

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


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
    """[sum, sum of squares] in float64 over all tensors; invariant to how tensors are split or fused.

    Converted to float64 a chunk at a time (small chunks on CPU, so that they stay in cache):
    no full-size float64 temporaries.
    """
    acc = None
    for _, t in named:
        flat = t.detach().reshape(-1)
        if acc is None:
            acc = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for c in flat.split(1 << 16 if flat.device.type == "cpu" else 1 << 24):
            c = c.to(torch.float64)
            acc[0] += c.sum()
            acc[1] += torch.dot(c, c)
    return [0.0, 0.0] if acc is None else acc.cpu().tolist()


class Digest:
    """A checksum added up part by part as tensors arrive or are sent (no copy of the weights
    kept): `value` equals checksum() over all the parts."""

    def __init__(self):
        self.value = [0.0, 0.0]

    def add(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        part = checksum(named)
        self.value = [self.value[0] + part[0], self.value[1] + part[1]]


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over the tensors when they lie adjacent, in order, in one storage; else None."""
    first = tensors[0]
    ptr, storage = first.data_ptr(), first.untyped_storage().data_ptr()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.data_ptr() != ptr or t.untyped_storage().data_ptr() != storage):
            return None
        ptr += t.numel() * t.element_size()
    numel = sum(t.numel() for t in tensors)
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (numel,))


def flatten_parameters(module: torch.nn.Module) -> None:
    """Move the parameters into one buffer per (device, dtype), in named_parameters order.

    Buckets are runs of consecutive parameters of one dtype (plan_buckets over the same names), so
    each bucket is then one span of memory that `SyncGroup.receive` fills in place.
    """
    groups: dict = {}
    for _, p in module.named_parameters():
        groups.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), params in groups.items():
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
        offset = 0
        for p in params:
            n = p.numel()
            flat[offset:offset + n].copy_(p.data.reshape(-1))
            p.data = flat[offset:offset + n].view_as(p)
            offset += n


def listen(world_size: int, timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's rendezvous store for a new process group, on a port the OS picks (`.port`) and
    this process holds from then on: a port merely found free could be taken by another process
    before the group binds it. (The store serves on every interface, whatever `host`.)"""
    return dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class SyncGroup:
    """A process group of its own between learner rank 0 (rank 0) and the rollout workers.

    store: rank 0's store from `listen` (the others connect to host:port). timeout_s bounds the
    rendezvous and every broadcast, on gloo and on NCCL (sync.timeout_s; no default here)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float, store: dist.TCPStore | None = None):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout=self.timeout)
        prefixed = dist.PrefixStore("weight_sync", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout  # NCCL's default is its watchdog's 10 minutes
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, self.timeout)
            self.device = torch.device("cpu")
        self._store = store  # the group needs the store alive
        self._buffers: list[torch.Tensor | None] = [None, None]  # reused across buckets and syncs

    def _buffer(self, i: int, bucket: Bucket) -> torch.Tensor:
        """Reusable buffer i (0 or 1) as a flat tensor of the bucket's dtype and size."""
        buf = self._buffers[i]
        if buf is None or buf.numel() < bucket.nbytes:
            buf = self._buffers[i] = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
        return buf[:bucket.nbytes].view(bucket.dtype)

    def _broadcast_async(self, flat: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([flat], opts)

    def _wait(self, work) -> None:
        if self.backend != "nccl":
            work.wait()  # gloo applies the group's timeout itself
            return
        # with a timeout, wait() blocks this thread until the collective completes and raises
        # when it does not in time; the group is then aborted (its communicator may be stuck)
        try:
            work.wait(self.timeout)
        except Exception:
            self.pg.abort()
            raise
        torch.cuda.current_stream().synchronize()

    def send(self, buckets: list[Bucket], get_tensors) -> None:
        """Broadcast each bucket. get_tensors(bucket) -> list of full tensors in bucket order.

        Tensors adjacent in one storage on this device go as they are; the others are packed into
        a reused buffer while the previous bucket is on the wire.
        """
        pending = None
        for i, bucket in enumerate(buckets):
            tensors = [t.detach() for t in get_tensors(bucket)]
            flat = contiguous_span(tensors)
            if flat is None or flat.device != self.device or flat.dtype != bucket.dtype:
                flat = self._buffer(i % 2, bucket)
                torch.cat([t.reshape(-1).to(self.device, bucket.dtype) for t in tensors], out=flat)
            if pending is not None:
                self._wait(pending)
            pending = self._broadcast_async(flat)
        if pending is not None:
            self._wait(pending)

    def receive(self, buckets: list[Bucket], into=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive each bucket and yield (name, tensor), bucket by bucket.

        into(bucket) -> the caller's destination tensors for it (or None): when they lie adjacent
        in one storage on this device, the bucket is received straight into them and the yielded
        tensors are the destinations themselves (copy_ onto itself is a no-op). Otherwise bucket
        k+1 is received into a reused buffer while the caller loads bucket k: copy each yielded
        tensor before asking for the next one.
        """
        def issue(i: int):
            bucket = buckets[i]
            dest = into(bucket) if into is not None else None
            flat = contiguous_span(dest) if dest else None
            if flat is None or flat.device != self.device or flat.dtype != bucket.dtype:
                flat = self._buffer(i % 2, bucket)
            return flat, self._broadcast_async(flat)

        nxt = issue(0) if buckets else None
        for i, bucket in enumerate(buckets):
            flat, work = nxt
            self._wait(work)
            if i + 1 < len(buckets):
                nxt = issue(i + 1)
            yield from unpack(flat, bucket)


def unpack(flat: torch.Tensor, bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) for each tensor of a bucket laid out in a flat tensor."""
    offset = 0
    for m in bucket.tensors:
        n = _numel(m.shape)
        yield m.name, flat[offset:offset + n].view(m.shape)
        offset += n


def off_by_one(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A testing aid (faults.corrupt_sync_at): the first tensor's first value loads off by +1."""
    for i, (name, tensor) in enumerate(named):
        if i == 0:
            tensor.view(-1)[0] += 1.0
        yield name, tensor
