"""User reward functions for the reward tests (loaded as `tests.data.user_rewards:<name>`)."""

import os
import time

NOT_CALLABLE = 3


def length_reward(response: str, answer: str, scale: float = 1.0) -> float:
    """len(response) * scale: a deterministic user reward with a keyword argument."""
    return len(response) * scale


def moody_reward(response: str, answer: str) -> float:
    """1.0, except: "sleep" hangs for a minute, "boom" raises, "crash" kills its own process,
    "hog" allocates memory without bound."""
    if response == "sleep":
        time.sleep(60)
    if response == "boom":
        raise RuntimeError("boom")
    if response == "crash":
        os._exit(3)
    if response == "hog":  # allocates without bound (1 GiB a step, each page touched)
        hoard = []
        while True:
            hoard.append(bytearray(2**30))
    return 1.0


def nan_reward(response: str, answer: str) -> float:
    return float("nan")
