"""Bounded staleness bookkeeping: a sample drawn at policy version v is learned at a version
<= v + k, the queue launches what the trainer's loop launches, and the bound is enforced."""

import pytest

from system.inflight import InFlight, InFlightQueue, StalenessError


def _simulate(k: int, steps: int) -> list[tuple[int, int, int]]:
    """The trainer's loop (Trainer.next_sample) with fake samples: (step, drawn at, learned at)."""
    queue, version, seen = InFlightQueue(k), 0, []
    draw = lambda s: InFlight(s, version, rows=[], sampler_state={"drawn_before": s})  # noqa: E731
    for step in range(1, steps + 1):
        if not queue:
            queue.push(draw(step))
        item, staleness = queue.take(step, version)
        assert staleness == version - item.version
        for ahead in queue.to_launch(step, steps):
            queue.push(draw(ahead))
        assert len(queue) == min(k, steps - step)  # up to k samples in flight
        seen.append((step, item.version, version))
        version += 1  # the learners' update and the weight sync
    return seen


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_staleness_is_bounded_by_rollout_ahead(k):
    seen = _simulate(k, steps=10)
    assert [s for s, _, _ in seen] == list(range(1, 11))
    staleness = [learned - drawn for _, drawn, learned in seen]
    assert all(0 <= x <= k for x in staleness)
    # the first k steps learn from fresher samples, then every step is exactly k versions behind
    assert staleness == [min(s - 1, k) for s in range(1, 11)]


def test_data_position_is_before_the_oldest_sample():
    q = InFlightQueue(2)
    assert q.data_position({"now": 1}) == {"now": 1}
    q.push(InFlight(3, 1, [], {"at": 3}))
    q.push(InFlight(4, 2, [], {"at": 4}))
    assert q.data_position({"now": 1}) == {"at": 3}
    with pytest.raises(ValueError, match="consecutive"):
        q.push(InFlight(6, 2, [], {}))


def test_a_sample_staler_than_k_is_refused():
    q = InFlightQueue(1)
    q.push(InFlight(5, 2, [], {}))
    with pytest.raises(StalenessError, match="staleness 2 > trainer.rollout_ahead=1"):
        q.take(5, 4)
    q.push(InFlight(5, 2, [], {}))
    with pytest.raises(RuntimeError, match="step 5 taken at step 6"):
        q.take(6, 3)


def _restoring_trainer(monkeypatch, ahead: int):
    """A Trainer with only what restore_pending uses: config, prompt sampler, in-flight queue."""
    from system import resume
    from system.config import load_config
    from system.data.prompts import PromptSampler
    from system.trainer import Trainer

    monkeypatch.setattr(resume.ray, "put", lambda x: x)  # no cluster: the outputs themselves
    t = Trainer.__new__(Trainer)
    t.cfg = load_config("configs/debug.yaml", [f"trainer.rollout_ahead={ahead}",
                                               "trainer.prompts_per_step=2", "rollout.group_size=2"])
    t.sampler = PromptSampler([{"prompt_ids": [i]} for i in range(10)], seed=0)
    t.inflight = InFlightQueue(ahead)
    return t


def _saved(step, version):
    return {"step": step, "version": version,
            "outputs": [{"responses": [[1], [2], [3], [4]], "logprobs": None, "version": version}]}


@pytest.mark.parametrize("saved,ahead,kept", [
    ([_saved(3, 0), _saved(4, 1)], 2, [(3, 0), (4, 1)]),  # every in-flight sample, in order
    ([_saved(3, 0), _saved(4, 1)], 1, [(3, 0)]),  # a smaller k: the rest is drawn again
])
def test_restore_in_flight_samples(tmp_path, monkeypatch, saved, ahead, kept):
    import torch

    from system import resume

    path = tmp_path / "pending_sample.pt"
    torch.save(saved, path)
    t = _restoring_trainer(monkeypatch, ahead)
    start = t.sampler.state_dict()
    resume.restore_pending(t, str(path))
    assert [(x.step, x.version) for x in t.inflight] == kept
    assert t.inflight.data_position(None) == start  # the data position before the first of them
    assert t.sampler.state_dict()["pos"] == 2 * len(kept)  # each took its step's prompts again
