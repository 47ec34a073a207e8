"""Reward functions by name, and their weighted combination.

A reward function is `fn(response: str, answer: str) -> float`. A spec names one and weights it:
    {"name": "math", "weight": 1.0, "kwargs": {...}}       (a dict, or a config RewardSpec)
Names: `math` (math_answer.py), `format` (regex match, 1/0), `exact` (the synthetic task), or
`package.module:function` for a user's own reward, called as fn(response, answer, **kwargs).
build_reward(specs) checks every spec up front, so a bad config fails before training starts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from collections.abc import Mapping
from typing import Any, Callable

from system.rewards.math_answer import make_math_reward

RewardFn = Callable[[str, str], float]

# Named patterns for the `format` reward; any other string is used as a regex itself.
FORMAT_PATTERNS = {
    "boxed": r"\\boxed\s*\{.+\}",
    "think": r"\A\s*<think>.+?</think>\s*\S.*\Z",  # reasoning in <think>...</think>, then an answer
}


def make_format_reward(pattern: str = "boxed", flags: str = "s") -> RewardFn:
    """1.0 when re.search(pattern, response) matches, else 0.0.

    pattern: a name in FORMAT_PATTERNS or a regex. flags: letters of re flags ("s" DOTALL, "i", "m").
    """
    regex = FORMAT_PATTERNS.get(pattern, pattern)
    bad = [f for f in flags if f.upper() not in ("S", "I", "M", "X")]
    if bad:
        raise ValueError(f"reward 'format': unknown regex flags {bad}; use letters of 'simx'")
    flag_bits = functools.reduce(lambda acc, f: acc | re.RegexFlag[f.upper()], flags, 0)
    try:
        compiled = re.compile(regex, flag_bits)
    except re.error as err:
        raise ValueError(f"reward 'format': invalid regex {regex!r} ({err})") from None

    def format_reward(response: str, answer: str) -> float:
        return 1.0 if compiled.search(response) else 0.0

    return format_reward


def make_exact_reward() -> RewardFn:
    """The synthetic task's reward: system.data.synthetic.exact_reward (imported on first call)."""

    def exact(response: str, answer: str) -> float:
        from system.data.synthetic import exact_reward

        return exact_reward(response, answer)

    return exact


REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "math": make_math_reward,
    "format": make_format_reward,
    "exact": make_exact_reward,
}


def load_user_reward(spec: str, **kwargs: Any) -> RewardFn:
    """Import `package.module:function` and bind kwargs; ValueError naming the spec if it is not there."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return functools.partial(fn, **kwargs) if kwargs else fn


def normalize_spec(spec: Any) -> dict:
    """A spec as a plain dict {name, weight, kwargs}; accepts dicts, mappings and dataclasses."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = dataclasses.asdict(spec)
    if not isinstance(spec, Mapping):
        raise ValueError(f"reward spec {spec!r}: expected a mapping with 'name', 'weight', 'kwargs'")
    unknown = set(spec) - {"name", "weight", "kwargs"}
    if unknown:
        raise ValueError(f"reward spec {dict(spec)!r}: unknown keys {sorted(unknown)} "
                         "(put function arguments under 'kwargs')")
    if not spec.get("name"):
        raise ValueError(f"reward spec {dict(spec)!r}: missing 'name'")
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"reward {spec['name']!r}: weight must be a finite number, got {weight!r}")
    return {"name": str(spec["name"]), "weight": float(weight), "kwargs": dict(spec.get("kwargs") or {})}


def make_reward(name: str, **kwargs: Any) -> RewardFn:
    """One reward function from its registry name or `module:function`."""
    if ":" in name:
        return load_user_reward(name, **kwargs)
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid names: {sorted(REGISTRY)} "
                         "or 'package.module:function'")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as err:  # a misspelled kwarg
        raise ValueError(f"reward {name!r}: bad kwargs {kwargs!r} ({err})") from err


class CombinedReward:
    """The weighted sum of several rewards: __call__(response, answer) -> (total, parts).

    parts maps a label to that reward's unweighted value; the label is the name (the function name
    for module:function), suffixed _2, _3... when it repeats. Errors propagate: the caller
    (RewardPool) decides what a failure scores.
    """

    def __init__(self, specs: list[dict]):
        self.specs = [normalize_spec(s) for s in specs]
        if not self.specs:
            raise ValueError("reward: need at least one reward spec")
        self.labels: list[str] = []
        for spec in self.specs:
            base = spec["name"].rpartition(":")[2]  # module:function is labelled by the function
            label, n = base, 1
            while label in self.labels:
                n += 1
                label = f"{base}_{n}"
            self.labels.append(label)
        self.weights = [s["weight"] for s in self.specs]
        self.fns = [make_reward(s["name"], **s["kwargs"]) for s in self.specs]

    def __call__(self, response: str, answer: str) -> tuple[float, dict[str, float]]:
        parts = {}
        for label, fn in zip(self.labels, self.fns):
            value = float(fn(response, answer))
            if not math.isfinite(value):
                raise ValueError(f"reward {label!r} returned {value}")
            parts[label] = value
        total = sum(w * parts[label] for w, label in zip(self.weights, self.labels))
        return total, parts


def build_reward(specs: list) -> CombinedReward:
    """Build the weighted reward from specs [{name, weight, kwargs}]; ValueError on a bad spec."""
    return CombinedReward(specs)
