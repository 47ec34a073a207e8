"""Weight sync: seconds to send a model from a "learner" process to rollout processes, against the bound.

Processes are Ray actors (one sender, R receivers), joined in a workers.weight_sync.SyncGroup
(gloo on CPU, NCCL on GPU), as in the trainer; the shapes are those of a Qwen2-style model
(embedding, per layer q/k/v/o with biases, gate/up/down, two norms, final norm).

Methods, each timed by the driver as the wall time of ray.get over every participant's one call:
- bound:       one broadcast of one flat buffer of the model's total size over the same group;
- ours:        SyncGroup.send / SyncGroup.receive over plan_buckets(64 MB buckets), with the
               layouts of the debug pipeline: the sender's parameters are adjacent views of one
               buffer (as DeepSpeed ZeRO-1/2 leaves them) and the receiver's too (as HFBackend
               leaves them after flatten_parameters), so every bucket goes in place;
- ours+checksum: the same plus the float64 checksum each side computes on every sync (the learner
               bucket by bucket, the receiver over what it loaded), as the trainer runs it;
- ours, packed: SyncGroup.send / receive when no layout allows in-place (every tensor allocated
               on its own on both sides, as under ZeRO-3 or for a receiver without `into`): two
               reused bucket buffers, packing/unpacking one while the other is on the wire;
- per-param:   one broadcast per parameter tensor, straight into the receiver's parameter;
- per-param+RPC: the same, with one Ray RPC per parameter and participant (the slow trainers' way).
Also measured once per size: pack (the sender's torch.cat of every bucket, no broadcast) and unpack
(the receiver's copy of every bucket into its parameters, no broadcast): the copies that `ours`
avoids and `ours, packed` overlaps.

The ratio is bound/method (time of the bound divided by the method's; target >= 0.7 for ours),
medians of --reps repetitions after one warm-up, methods interleaved within a repetition.

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
METHODS = ("bound", "ours", "ours+checksum", "ours, packed", "per-param", "per-param+RPC")
ATTRS = {"ours+checksum": "ours_checksum", "ours, packed": "ours_packed"}


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

        self.sync = SyncGroup(host, port, self.rank, self.world, backend, timeout_s=600)
        return True

    def alloc(self, shapes: list, dtype: str, bucket_mb: float) -> dict:
        """Parameters twice: views into one flat buffer, and each tensor allocated on its own.

        Random on the sender, zeros on the receivers."""
        from workers.weight_sync import TensorMeta, plan_buckets

        self.params = self.flat = self.separate = None  # free the previous size first
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
        self.separate = {name: t.clone() for name, t in self.params.items()}
        self.buckets = plan_buckets([TensorMeta(n, tuple(s), dt) for n, s in shapes],
                                    int(bucket_mb * 2**20))
        biggest = max(b.numel for b in self.buckets) * self.flat.element_size()
        return {"numel": total, "buckets": len(self.buckets), "tensors": len(shapes),
                "biggest_bucket_mb": biggest / 2**20}

    def _tensors(self, bucket):
        return [self.params[m.name] for m in bucket.tensors]

    def _separate(self, bucket):
        return [self.separate[m.name] for m in bucket.tensors]

    # ---- one call per sync ----------------------------------------------------------------------
    def bound(self) -> float:
        t0 = time.perf_counter()
        broadcast(self.sync, self.flat)
        return time.perf_counter() - t0

    def _ours(self, params: dict, get_tensors, into, digest: bool) -> None:
        from workers.weight_sync import checksum

        if self.rank == 0:
            total = [0.0, 0.0]

            def tensors(bucket):  # as workers.learner.Learner.send_weights
                ts = get_tensors(bucket)
                if digest:
                    part = checksum(zip(bucket.tensors, ts))
                    total[0], total[1] = total[0] + part[0], total[1] + part[1]
                return ts

            self.sync.send(self.buckets, tensors)
        else:  # as workers.rollout.HFBackend.load_weights
            for name, tensor in self.sync.receive(self.buckets, into=into):
                params[name].data.copy_(tensor)
                if digest:
                    checksum([(name, params[name])])

    def ours(self) -> float:
        t0 = time.perf_counter()
        self._ours(self.params, self._tensors, self._tensors, digest=False)
        return time.perf_counter() - t0

    def ours_checksum(self) -> float:
        t0 = time.perf_counter()
        self._ours(self.params, self._tensors, self._tensors, digest=True)
        return time.perf_counter() - t0

    def ours_packed(self) -> float:
        t0 = time.perf_counter()
        self._ours(self.separate, self._separate, None, digest=False)
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
            flat = torch.cat([t.detach().reshape(-1).to(self.device, b.dtype) for t in self._separate(b)])
            del flat
        return time.perf_counter() - t0

    def unpack_only(self) -> float:
        flat = torch.empty(max(b.numel for b in self.buckets), dtype=self.flat.dtype, device=self.device)
        t0 = time.perf_counter()
        for b in self.buckets:
            offset = 0
            for m in b.tensors:
                n = _numel(m.shape)
                self.separate[m.name].copy_(flat[offset:offset + n].view(m.shape))
                offset += n
        return time.perf_counter() - t0

    def checksum_s(self) -> float:
        from workers.weight_sync import checksum

        t0 = time.perf_counter()
        checksum(self.params.items())
        return time.perf_counter() - t0

    def digest(self, which: str) -> tuple[float, float]:
        """Sum and sum of squares in float64 of one copy of the parameters."""
        from workers.weight_sync import checksum

        return tuple(checksum((self.params if which == "flat" else self.separate).items()))

    def zero(self) -> None:
        if self.rank != 0:
            self.flat.zero_()
            for t in self.separate.values():
                t.zero_()


def broadcast(sync, flat: torch.Tensor) -> None:
    """One blocking broadcast from rank 0 over the sync group's own process group."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    sync.pg.broadcast([flat], opts).wait()
    if sync.backend == "nccl":
        torch.cuda.current_stream().synchronize()


# ---- driver -------------------------------------------------------------------------------------


def timed(peers, method: str, names: list[str]) -> float:
    t0 = time.perf_counter()
    if method == "per-param+RPC":
        for name in names:
            ray.get([p.one_param.remote(name) for p in peers])
    else:
        attr = ATTRS.get(method, method.replace("-", "_"))
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
        # correctness: both paths deliver the sender's bytes
        for method, which in (("ours", "flat"), ("ours, packed", "separate")):
            ray.get([p.zero.remote() for p in peers])
            timed(peers, method, names)
            digests = ray.get([p.digest.remote(which) for p in peers])
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
        parts["checksum"] = ray.get(peers[0].checksum_s.remote())
        row = {"size": size, "receivers": n_recv, "numel": info["numel"], "bytes": nbytes,
               "tensors": info["tensors"], "buckets": info["buckets"], "reps": reps,
               **{m: median(ts) for m, ts in times.items()}, **parts}
        print(f"[weight_sync] {size} x{n_recv}: " + ", ".join(
            f"{m} {row[m]:.3f}s" for m in (*METHODS, "pack", "unpack", "checksum")), flush=True)
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
            is_ours = m == "ours"  # the target is on the pipeline's path
            rows.append([
                r["size"], r["receivers"], f"{r['numel'] / 1e6:.1f}M", f"{r['bytes'] / 2**20:.0f}",
                f"{r['tensors']}/{r['buckets']}", m, f"{r[m]:.3f}", f"{r['bytes'] / r[m] / 1e9:.2f}",
                f"{ratio:.2f}", ">= 0.7" if is_ours else "", verdict(ratio >= 0.7) if is_ours else ""])
    parts_headers = ["model", "recv", "bound s", "ours s", "ours, packed s", "pack s (sender cat)",
                     "unpack s (receiver copy)", "checksum s (float64, one side)"]
    parts = [[r["size"], r["receivers"], f"{r['bound']:.3f}", f"{r['ours']:.3f}",
              f"{r['ours, packed']:.3f}", f"{r['pack']:.3f}", f"{r['unpack']:.3f}", f"{r['checksum']:.3f}"]
             for r in results]
    dev = "GPU, nccl" if torch.cuda.is_available() else "CPU, gloo over loopback TCP"
    return (f"dtype={args.dtype}, bucket {args.bucket_mb:g} MB, {dev}, Ray actors with "
            f"{args.threads} torch thread(s) each; seconds are medians of the reps after one warm-up; "
            f"GB/s = model bytes / seconds (per receiver: a broadcast to R receivers moves R times "
            f"that); ratio = bound seconds / method seconds (target >= 0.7 for ours).\n\n"
            + markdown_table(headers, rows)
            + "\n\nThe copies that `ours` avoids and `ours, packed` overlaps, and the checksum (measured "
            "separately, same run):\n\n"
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
