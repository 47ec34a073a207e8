"""A user reward for the failure tests (`tests.faults.fault_rewards:flaky`): it hangs when the
reference answer is "hang" and raises when it is "boom", whatever the model wrote."""

from __future__ import annotations

import time


def flaky(response: str, answer: str) -> float:
    if answer == "hang":
        time.sleep(60)
    if answer == "boom":
        raise ValueError("this reward fails on purpose")
    return float(response.strip() == answer)
