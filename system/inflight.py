"""Bounded staleness: the samples in flight, each tagged with the policy version that draws it.

With trainer.rollout_ahead = k the trainer keeps up to k samples in flight: at step s, after taking
step s's sample, it launches the samples of steps s+1 .. s+k that are not yet launched, before the
learners' update. Rollout workers run their calls in submission order, so a sample launched now is
drawn with the current weights (version v = s - 1, the updates done so far) and learned at step
s + k, at version s + k - 1: its staleness is k, never more. k = 0 is on-policy; the first k steps
of a run learn from fresher samples (staleness 0, 1, ..., k - 1).

Checkpoints keep every in-flight sample and the data position before the first of them was drawn
(`Trainer.save_checkpoint`), so a resumed run learns exactly what the uninterrupted one would.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


class StalenessError(RuntimeError):
    """A sample would be learned more than trainer.rollout_ahead versions after it was drawn."""


@dataclass
class InFlight:
    step: int  # the training step that learns from it
    version: int  # the policy version that draws it
    rows: list  # the prompts (PromptSampler rows)
    sampler_state: dict  # data position before its rows were taken
    launched: Any = None  # (rollout refs, version) from Trainer.launch_generate
    ref_launched: Any = None  # its reference forward, already started (None: computed when learned)


class InFlightQueue:
    """Samples launched ahead, oldest first; `take` checks the staleness bound."""

    def __init__(self, ahead: int):
        self.ahead = ahead
        self._items: deque[InFlight] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def push(self, item: InFlight) -> None:
        if self._items and item.step != self._items[-1].step + 1:
            raise ValueError(f"in-flight samples must be for consecutive steps: step {item.step} "
                             f"after step {self._items[-1].step}")
        self._items.append(item)

    def to_launch(self, step: int, last_step: int) -> list[int]:
        """Steps whose samples to launch now, while step `step` is learned: up to step + k."""
        first = self._items[-1].step + 1 if self._items else step + 1
        return list(range(first, min(step + self.ahead, last_step) + 1))

    def take(self, step: int, version: int) -> tuple[InFlight, int]:
        """The oldest sample, which must be step `step`'s, and its staleness at `version`."""
        item = self._items.popleft()
        if item.step != step:
            raise RuntimeError(f"in-flight sample of step {item.step} taken at step {step}")
        staleness = version - item.version
        if not 0 <= staleness <= self.ahead:
            raise StalenessError(f"step {step}: sample drawn at policy version {item.version}, "
                                 f"learned at {version}: staleness {staleness} > "
                                 f"trainer.rollout_ahead={self.ahead}")
        return item, staleness

    def data_position(self, current: dict) -> dict:
        """The data position before the oldest in-flight sample (`current` when none)."""
        return self._items[0].sampler_state if self._items else current

    def clear(self) -> None:
        self._items.clear()
