"""Broken user rewards for the fuzz test (`tests.faults.fuzz_rewards:<name>`): each returns
something that is not a finite number, or raises, even on the reference answer itself."""

NOT_A_FUNCTION = "a string"


def returns_nan(response: str, answer: str) -> float:
    return float("nan")


def returns_inf(response: str, answer: str) -> float:
    return float("-inf")


def returns_text(response: str, answer: str):
    return "1.0 points"


def returns_none(response: str, answer: str):
    return None


def returns_list(response: str, answer: str):
    return [1.0]


def raises(response: str, answer: str) -> float:
    raise RuntimeError("reward crashed")


def wrong_arity(response: str) -> float:
    return 1.0


def exits(response: str, answer: str) -> float:
    raise SystemExit(3)
