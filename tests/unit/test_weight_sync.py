"""SyncGroup over gloo, two ranks in two threads: what the receiver loads equals what was sent, bit
for bit, on both the in-place path (flattened parameters) and the packed path (buffers reused
across buckets); checksum against a naive float64 reference."""

import socket
import threading

import torch

from workers.weight_sync import (Digest, SyncGroup, TensorMeta, checksum, contiguous_span,
                                 flatten_parameters, plan_buckets)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 11))
    m[1].to(torch.bfloat16)  # a dtype change in the middle: three buckets of runs of one dtype
    return m


def _sync(sender_tensors, buckets, receive):
    """Run rank 0 sending and rank 1 receiving; returns what receive() returned."""
    port, out, errors = _free_port(), {}, []

    def rank(r):
        try:
            group = SyncGroup("127.0.0.1", port, r, 2, "gloo", timeout_s=60)
            if r == 0:
                for _ in range(2):  # twice: buffers are reused across syncs
                    group.send(buckets, lambda b: [sender_tensors[m.name] for m in b.tensors])
            else:
                for _ in range(2):
                    out["result"] = receive(group)
        except Exception as e:  # surfaced below, with the thread's rank
            errors.append((r, e))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out["result"]


def _buckets(model, bucket_bytes):
    metas = [TensorMeta(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
    return plan_buckets(metas, bucket_bytes)


def test_in_place_receive_into_flattened_parameters_is_bit_exact():
    src, dst = _model(0), _model(1)
    flatten_parameters(dst)
    before = {n: p.data.data_ptr() for n, p in dst.named_parameters()}
    buckets = _buckets(src, bucket_bytes=64)  # small: several buckets per dtype
    assert len(buckets) >= 4
    params = dict(dst.named_parameters())

    def receive(group):
        for name, t in group.receive(buckets, into=lambda b: [params[m.name].data for m in b.tensors]):
            params[name].data.copy_(t)
        assert group._buffers == [None, None], "received through a buffer, not in place"
        return checksum(dst.named_parameters())

    digest = _sync(dict(src.named_parameters()), buckets, receive)
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), n
        assert q.data.data_ptr() == before[n], f"{n} was reallocated"
    assert digest == checksum(src.named_parameters())


def test_packed_receive_with_reused_buffers_is_bit_exact():
    src, dst = _model(0), _model(1)  # neither flattened: the sender packs, the receiver copies out
    buckets = _buckets(src, bucket_bytes=64)
    params = dict(dst.named_parameters())

    def receive(group):
        for name, t in group.receive(buckets):
            params[name].data.copy_(t)
        assert group._buffers[0] is not None and group._buffers[1] is not None

    _sync(dict(src.named_parameters()), buckets, receive)
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), n


def test_contiguous_span_only_for_adjacent_tensors_in_order():
    flat = torch.arange(10.0)
    a, b = flat[:4].view(2, 2), flat[4:10].view(3, 2)
    span = contiguous_span([a, b])
    assert span is not None and span.data_ptr() == flat.data_ptr() and torch.equal(span, flat)
    assert contiguous_span([b, a]) is None  # out of order
    assert contiguous_span([flat[:4], flat[5:]]) is None  # a gap
    assert contiguous_span([torch.zeros(3), torch.zeros(3)]) is None  # two storages
    assert contiguous_span([flat[:4], flat[4:].to(torch.float64)]) is None  # two dtypes


def test_flatten_parameters_keeps_values_and_ties():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 4)
    head = torch.nn.Linear(4, 6, bias=False)
    head.weight = emb.weight  # tied, as in models with tied embeddings
    m = torch.nn.ModuleDict({"emb": emb, "head": head, "mid": torch.nn.Linear(4, 4)})
    values = {n: p.detach().clone() for n, p in m.named_parameters()}
    flatten_parameters(m)
    assert m["head"].weight is m["emb"].weight
    named = list(m.named_parameters())
    for n, p in named:
        assert torch.equal(p, values[n]), n
    assert contiguous_span([p.data for _, p in named]) is not None


def test_checksum_matches_naive_float64_and_is_split_invariant():
    torch.manual_seed(0)
    tensors = [("a", torch.randn(300_000)), ("b", torch.randn(17, 5).to(torch.bfloat16))]
    naive = [sum(t.double().sum().item() for _, t in tensors),
             sum((t.double() ** 2).sum().item() for _, t in tensors)]
    got = checksum(tensors)
    assert abs(got[0] - naive[0]) <= 1e-9 * max(1.0, abs(naive[1]))
    assert abs(got[1] - naive[1]) <= 1e-12 * naive[1]
    split = [("a0", tensors[0][1][:123_457]), ("a1", tensors[0][1][123_457:]), tensors[1]]
    assert abs(checksum(split)[1] - got[1]) <= 1e-12 * got[1]
    assert checksum([]) == [0.0, 0.0]
    digest = Digest()  # added up as buckets arrive: the same as one checksum over everything
    for part in split:
        digest.add([part])
    assert abs(digest.value[0] - got[0]) <= 1e-9 * max(1.0, abs(naive[1]))
    assert abs(digest.value[1] - got[1]) <= 1e-12 * got[1]


def _bind(port: int) -> bool:
    """Whether another process could take this port now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_rank_0_holds_the_rendezvous_ports_it_names():
    """A port found free, closed and named is free for anyone until the group binds it: the
    learner's DeepSpeed group and weight-sync group are opened on ports held from the start."""
    from workers.learner import LearnerWorker

    worker = LearnerWorker.__new__(LearnerWorker)
    worker.world_size = 2
    ports = [worker.address()[1], worker.open_weight_sync(2, 30)[1]]
    assert not any(_bind(p) for p in ports), ports


def test_a_sync_that_waits_too_long_fails_within_the_timeout():
    """A rollout worker that never joins the broadcast (lost mid-sync): learner rank 0's send fails
    after sync.timeout_s instead of blocking the run."""
    import time

    from workers.weight_sync import listen

    store = listen(2, 2.0)
    errors, done = [], threading.Event()

    def never_broadcasts():  # joins the group, keeps it open, never takes part in a collective
        try:
            group = SyncGroup("127.0.0.1", store.port, 1, 2, "gloo", timeout_s=2.0)
            done.wait(60)
            del group
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    peer = threading.Thread(target=never_broadcasts)
    peer.start()
    try:
        group = SyncGroup("127.0.0.1", store.port, 0, 2, "gloo", timeout_s=2.0, store=store)
        bucket = plan_buckets([TensorMeta("w", (4,), torch.float32)], 1 << 20)
        start = time.monotonic()
        try:
            group.send(bucket, lambda b: [torch.ones(4)])
            raise AssertionError("the send did not fail")
        except RuntimeError as err:
            assert "timed out" in str(err).lower(), err
        assert time.monotonic() - start < 20
    finally:
        done.set()
        peer.join(30)
    assert not errors


def test_nccl_groups_get_the_sync_timeout(monkeypatch):
    """NCCL's group is built with sync.timeout_s (a CPU machine has no NCCL: the constructor is a
    stand-in that records its options), and a wait that times out aborts the group and raises."""
    import datetime
    import types

    import torch.distributed as dist

    from workers.weight_sync import listen

    built = {}

    class FakeNCCL:
        Options = types.SimpleNamespace  # Backend.Options: `_timeout` is its time limit

        def __init__(self, store, rank, size, options=None):
            built.update(options=options, aborted=False)

        def abort(self):
            built["aborted"] = True

    class HungWork:
        def wait(self, timeout=None):
            built["wait_timeout"] = timeout
            raise RuntimeError("Work timed out")

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    store = listen(1, 5.0)
    group = SyncGroup("127.0.0.1", store.port, 0, 1, "nccl", timeout_s=7.0, store=store)
    assert built["options"]._timeout == datetime.timedelta(seconds=7)
    try:
        group._wait(HungWork())
        raise AssertionError("the wait did not fail")
    except RuntimeError:
        pass
    assert built["wait_timeout"] == datetime.timedelta(seconds=7) and built["aborted"]
