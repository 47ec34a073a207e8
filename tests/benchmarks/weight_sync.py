"""Weight sync: seconds to send a model from a "learner" process to rollout processes, against the bound.

Processes are Ray actors (one sender, R receivers), joined in a workers.weight_sync.SyncGroup
(gloo on CPU, NCCL on GPU), as in the trainer. Each process holds its parameters as views into one
contiguous buffer (so the bound below needs no extra memory); the shapes are those of a Qwen2-style
model (embedding, per layer q/k/v/o with biases, gate/up/down, two norms, final norm).

Methods, each timed by the driver as the wall time of ray.get over every participant's one call:
- bound:       one broadcast of one flat buffer of the model's total size over the same group;
- ours:        SyncGroup.send / SyncGroup.receive over plan_buckets(64 MB buckets); the receiver
               copies every tensor into its own parameters, as workers.rollout.HFBackend.load_weights;
- per-param:   one broadcast per parameter tensor, straight into the receiver's parameter;
- per-param+RPC: the same, with one Ray RPC per parameter and participant (the slow trainers' way);
- prealloc+overlap: prototype of a change to SyncGroup that fits every backend (see the report):
               two pre-allocated bucket buffers reused across buckets and syncs, packing bucket k
               (sender) / unpacking bucket k-1 (receiver) while the other bucket is on the wire;
- zero-copy:   prototype of a change for the layouts that allow it: when a bucket's tensors are
               adjacent views of one storage (the sender's here and under DeepSpeed ZeRO-1/2's flat
               buffers; the receiver's once HFBackend keeps its parameters in one flat buffer in
               bucket order), broadcast that span in place, no pack and no unpack.
Also measured once per size, to explain the gap: pack (the sender's torch.cat of every bucket, no
broadcast), unpack (the receiver's torch.empty + copy into parameters, no broadcast) and the
project's float64 checksum of the model (run by both sides on every sync, not in the ratio),
and the same checksum converted to float64 64K elements at a time (proposed; the two must agree).

The ratio is bound/ours (time of the bound divided by ours; target >= 0.7), medians of --reps
repetitions after one warm-up, methods interleaved within a repetition.

Run from the repository root (about 3-5 minutes on 2 CPU cores):
    python tests/benchmarks/weight_sync.py                       # 10M, 100M, 500M fp32; 1 and 2 receivers
    python tests/benchmarks/weight_sync.py --sizes 10M --receivers 1 --no-append
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from _common import ROOT, markdown_table, median, verdict, publish

import ray  # noqa: E402
import torch  # noqa: E402

# Qwen2-style shapes (hidden, intermediate, layers, vocab, heads, kv heads) that give ~10M/100M/500M
# parameters; 500M is Qwen2.5-0.5B itself (tied embeddings, 290 tensors).
SHAPES = {
    "10M": (256, 1024, 6, 16384, 4, 2),
    "100M": (768, 3072, 9, 32000, 12, 4),
    "500M": (896, 4864, 24, 151936, 14, 2),
}
DEFAULT_REPS = {"10M": 5, "100M": 3, "500M": 2}
METHODS = ("bound", "ours", "prealloc+overlap", "zero-copy", "per-param", "per-param+RPC")


def model_shapes(hidden, inter, layers, vocab, heads, kv) -> list[tuple[str, tuple]]:
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.q_proj.bias", (heads * head_dim,)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.k_proj.bias", (kv * head_dim,)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.bias", (kv * head_dim,)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@ray.remote(num_cpus=0)
class Peer:
    """One process of the sync group: rank 0 sends, ranks 1..R receive."""

    def __init__(self, rank: int, world: int, threads: int):
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, host: str, port: int, backend: str) -> bool:
        from workers.weight_sync import SyncGroup

        self.sync = SyncGroup(host, port, self.rank, self.world, backend)
        return True

    def alloc(self, shapes: list, dtype: str, bucket_mb: float) -> dict:
        """Parameters as views into one flat buffer; random on the sender, zeros on receivers."""
        from workers.weight_sync import TensorMeta, plan_buckets

        self.params = self.flat = self.bufs = None  # free the previous size first
        dt = getattr(torch, dtype)
        total = sum(_numel(s) for _, s in shapes)
        self.flat = torch.zeros(total, dtype=dt, device=self.device)
        if self.rank == 0:
            self.flat.uniform_(-1, 1)
        self.params, offset = {}, 0
        for name, shape in shapes:
            n = _numel(shape)
            self.params[name] = self.flat[offset:offset + n].view(shape)
            offset += n
        self.buckets = plan_buckets([TensorMeta(n, tuple(s), dt) for n, s in shapes],
                                    int(bucket_mb * 2**20))
        biggest = max(b.numel for b in self.buckets) * self.flat.element_size()
        self.bufs = [torch.empty(biggest, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return {"numel": total, "buckets": len(self.buckets), "tensors": len(shapes),
                "biggest_bucket_mb": biggest / 2**20}

    def _tensors(self, bucket):
        return [self.params[m.name] for m in bucket.tensors]

    # ---- one call per sync ----------------------------------------------------------------------
    def bound(self) -> float:
        t0 = time.perf_counter()
        broadcast(self.sync, self.flat)
        return time.perf_counter() - t0

    def ours(self) -> float:
        t0 = time.perf_counter()
        if self.rank == 0:
            self.sync.send(self.buckets, self._tensors)
        else:  # as HFBackend.load_weights
            for name, tensor in self.sync.receive(self.buckets):
                self.params[name].data.copy_(tensor)
        return time.perf_counter() - t0

    def prealloc_overlap(self) -> float:
        t0 = time.perf_counter()
        if self.rank == 0:
            proposed_send(self.sync, self.buckets, self._tensors, self.bufs)
        else:
            for name, tensor in proposed_receive(self.sync, self.buckets, self.bufs):
                self.params[name].data.copy_(tensor)
        return time.perf_counter() - t0

    def zero_copy(self) -> float:
        t0 = time.perf_counter()
        for bucket in self.buckets:
            span = contiguous_span(self._tensors(bucket))
            if span is None:
                raise RuntimeError("zero-copy: a bucket's tensors are not adjacent in memory")
            broadcast(self.sync, span)
        return time.perf_counter() - t0

    def per_param(self) -> float:
        t0 = time.perf_counter()
        for p in self.params.values():
            broadcast(self.sync, p)
        return time.perf_counter() - t0

    def one_param(self, name: str) -> None:
        broadcast(self.sync, self.params[name])

    # ---- parts, to explain the gap --------------------------------------------------------------
    def pack_only(self) -> float:
        t0 = time.perf_counter()
        for b in self.buckets:
            flat = torch.cat([t.detach().reshape(-1).to(self.device, b.dtype) for t in self._tensors(b)])
            del flat
        return time.perf_counter() - t0

    def unpack_only(self) -> float:
        t0 = time.perf_counter()
        for b in self.buckets:
            flat = torch.empty(b.numel, dtype=b.dtype, device=self.device)
            offset = 0
            for m in b.tensors:
                n = _numel(m.shape)
                self.params[m.name].data.copy_(flat[offset:offset + n].view(m.shape))
                offset += n
        return time.perf_counter() - t0

    def checksum_s(self) -> tuple[float, float]:
        """Seconds of the project's checksum and of the proposed chunked one; they must agree."""
        from workers.weight_sync import checksum

        t0 = time.perf_counter()
        ours = checksum(self.params.items())
        t1 = time.perf_counter()
        chunked = checksum_chunked(self.params.items())
        t2 = time.perf_counter()
        if any(abs(a - b) > 1e-9 * max(abs(a), 1.0) for a, b in zip(ours, chunked)):
            raise RuntimeError(f"chunked checksum {chunked} != checksum {ours}")
        return t1 - t0, t2 - t1

    def digest(self) -> tuple[float, float]:
        """Sum and sum of squares in float64, in chunks (no full-size temporaries)."""
        total = squares = 0.0
        for chunk in self.flat.split(2**22):
            c = chunk.double()
            total, squares = total + float(c.sum()), squares + float((c * c).sum())
        return total, squares

    def zero(self) -> None:
        if self.rank != 0:
            self.flat.zero_()


# ---- the proposed SyncGroup.send / receive (prototypes of the changes recommended in the report)


def broadcast(sync, flat: torch.Tensor) -> None:
    """One blocking broadcast from rank 0 over the sync group's own process group."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    sync.pg.broadcast([flat], opts).wait()
    if sync.backend == "nccl":
        torch.cuda.current_stream().synchronize()


def checksum_chunked(named) -> list[float]:
    """workers.weight_sync.checksum converted to float64 64K elements at a time (stays in cache)."""
    acc = None
    for _, t in named:
        flat = t.detach().reshape(-1)
        if acc is None:
            acc = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for c in flat.split(1 << 16 if flat.device.type == "cpu" else 1 << 24):
            c = c.to(torch.float64)
            acc[0] += c.sum()
            acc[1] += torch.dot(c, c)
    return acc.cpu().tolist()


def contiguous_span(tensors: list) -> torch.Tensor | None:
    """A 1-D view covering the tensors when they are adjacent, in order, in one storage; else None."""
    first = tensors[0]
    ptr, storage = first.data_ptr(), first.untyped_storage().data_ptr()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.data_ptr() != ptr
                or t.untyped_storage().data_ptr() != storage):
            return None
        ptr += t.numel() * t.element_size()
    total = sum(t.numel() for t in tensors)
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,))


def _bucket_view(buf: torch.Tensor, bucket) -> torch.Tensor:
    nbytes = bucket.numel * torch.empty((), dtype=bucket.dtype).element_size()
    return buf[:nbytes].view(bucket.dtype)


def proposed_send(sync, buckets, get_tensors, bufs) -> None:
    """Pack bucket k into a reused buffer while bucket k-1 is on the wire."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    pending = None
    for i, bucket in enumerate(buckets):
        flat = _bucket_view(bufs[i % 2], bucket)
        torch.cat([t.detach().reshape(-1) for t in get_tensors(bucket)], out=flat)
        if pending is not None:
            pending.wait()
        pending = sync.pg.broadcast([flat], opts)
    if pending is not None:
        pending.wait()


def proposed_receive(sync, buckets, bufs):
    """Receive bucket k+1 into the other buffer while the caller copies out bucket k."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0

    def issue(i):
        flat = _bucket_view(bufs[i % 2], buckets[i])
        return flat, sync.pg.broadcast([flat], opts)

    nxt = issue(0) if buckets else None
    for i, bucket in enumerate(buckets):
        flat, work = nxt
        work.wait()
        if i + 1 < len(buckets):
            nxt = issue(i + 1)
        offset = 0
        for m in bucket.tensors:
            n = _numel(m.shape)
            yield m.name, flat[offset:offset + n].view(m.shape)
            offset += n


# ---- driver -------------------------------------------------------------------------------------


def timed(peers, method: str, names: list[str]) -> float:
    t0 = time.perf_counter()
    if method == "per-param+RPC":
        for name in names:
            ray.get([p.one_param.remote(name) for p in peers])
    else:
        attr = method.replace("-", "_").replace("+", "_")
        ray.get([getattr(p, attr).remote() for p in peers])
    return time.perf_counter() - t0


def run_config(n_recv: int, args) -> list[dict]:
    world = 1 + n_recv
    peers = [Peer.remote(r, world, args.threads) for r in range(world)]
    host, port = ray.get(peers[0].address.remote())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    ray.get([p.join.remote(host, port, backend) for p in peers])
    results = []
    for size in args.sizes:
        shapes = model_shapes(*SHAPES[size])
        names = [n for n, _ in shapes]
        info = ray.get([p.alloc.remote(shapes, args.dtype, args.bucket_mb) for p in peers])[0]
        nbytes = info["numel"] * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        # correctness: ours and proposed deliver the sender's bytes
        for method in ("ours", "prealloc+overlap", "zero-copy"):
            ray.get([p.zero.remote() for p in peers])
            timed(peers, method, names)
            digests = ray.get([p.digest.remote() for p in peers])
            if any(d != digests[0] for d in digests[1:]):
                raise SystemExit(f"{method}: receivers' weights differ from the sender's: {digests}")
        reps = args.reps or DEFAULT_REPS[size]
        times = {m: [] for m in METHODS}
        for rep in range(reps + 1):  # rep 0 is the warm-up
            for method in METHODS:
                t = timed(peers, method, names)
                if rep:
                    times[method].append(t)
        parts = {
            "pack": ray.get(peers[0].pack_only.remote()),
            "unpack": median(ray.get([p.unpack_only.remote() for p in peers[1:]])),
        }
        parts["checksum"], parts["checksum_chunked"] = ray.get(peers[0].checksum_s.remote())
        row = {"size": size, "receivers": n_recv, "numel": info["numel"], "bytes": nbytes,
               "tensors": info["tensors"], "buckets": info["buckets"], "reps": reps,
               **{m: median(ts) for m, ts in times.items()}, **parts}
        print(f"[weight_sync] {size} x{n_recv}: " + ", ".join(
            f"{m} {row[m]:.3f}s" for m in (*METHODS, "pack", "unpack", "checksum", "checksum_chunked")), flush=True)
        results.append(row)
    for p in peers:
        ray.kill(p)
    return results


def report(results: list[dict], args) -> str:
    headers = ["model", "recv", "params", "MB", "tensors/buckets", "method", "seconds", "GB/s",
               "bound/method", "target", "status"]
    rows = []
    for r in results:
        for m in METHODS:
            ratio = r["bound"] / r[m]
            is_ours = m == "ours"
            rows.append([
                r["size"], r["receivers"], f"{r['numel'] / 1e6:.1f}M", f"{r['bytes'] / 2**20:.0f}",
                f"{r['tensors']}/{r['buckets']}", m, f"{r[m]:.3f}", f"{r['bytes'] / r[m] / 1e9:.2f}",
                f"{ratio:.2f}", ">= 0.7" if is_ours else "", verdict(ratio >= 0.7) if is_ours else ""])
    parts_headers = ["model", "recv", "bound s", "ours s", "pack s (sender cat)",
                     "unpack s (recv empty+copy)", "checksum s (float64, each side)",
                     "chunked checksum s (proposed)"]
    parts = [[r["size"], r["receivers"], f"{r['bound']:.3f}", f"{r['ours']:.3f}", f"{r['pack']:.3f}",
              f"{r['unpack']:.3f}", f"{r['checksum']:.3f}", f"{r['checksum_chunked']:.3f}"]
             for r in results]
    dev = "GPU, nccl" if torch.cuda.is_available() else "CPU, gloo over loopback TCP"
    return (f"dtype={args.dtype}, bucket {args.bucket_mb:g} MB, {dev}, Ray actors with "
            f"{args.threads} torch thread(s) each; seconds are medians of the reps after one warm-up; "
            f"GB/s = model bytes / seconds (per receiver: a broadcast to R receivers moves R times "
            f"that); ratio = bound seconds / method seconds (target >= 0.7 for ours).\n\n"
            + markdown_table(headers, rows)
            + "\n\nWhere the time of `ours` goes (measured separately, same run):\n\n"
            + markdown_table(parts_headers, parts) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--receivers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (0: 5/3/2 by size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=256 * 2**20, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}})
    try:
        results = []
        for n_recv in args.receivers:
            results += run_config(n_recv, args)
    finally:
        ray.shutdown()
    body = report(results, args) + f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.\n"
    publish('weight_sync', 'bucketed broadcast vs one flat broadcast', body, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
