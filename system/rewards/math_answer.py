"""The `math` reward: extract a response's final answer and check it against the gold with math-verify.

Steps: (1) take the final answer out of the response (the last \\boxed{...}, else the last
"#### x" line, else the last "the answer is x", else the last number); (2) take the gold the same
way when it is a full solution (it holds \\boxed{} or "####"), else use it whole; (3) parse both
with math_verify.parse inside "$...$" (its LaTeX extractor needs delimiters: a bare "\\dfrac{3}{4}"
parses to nothing) and compare with math_verify.verify(gold, prediction) (not symmetric: gold first).

math-verify bounds its own parse/verify time with signal.alarm, which only works in the main thread
of a process; elsewhere it raises ValueError. We pass its timeouts only when running in the main
thread (true in RewardPool worker processes and in a plain driver), and None otherwise: then the
RewardPool's per-sample limit is the only bound. Note that signal.alarm also replaces any outer
SIGALRM timer of the same process (pytest-timeout's signal method, a driver's own alarm).
When math-verify's own limit fires it logs a warning and the comparison counts as unequal (0.0):
such a sample is not in the pool's reward_timeouts, which counts only the pool's own limit.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Callable, Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if none.

    Escaped braces (\\{ \\}) inside do not count, so "\\boxed{\\{1, 2\\}}" gives "\\{1, 2\\}".
    None too when the last box is unterminated (a truncated response): its answer is incomplete.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character, braces included
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def _clean_tail(text: str) -> str:
    """Cut a free-text answer at the end of its sentence and drop markdown emphasis."""
    text = re.split(r"\.(?:\s|$)", text.strip(), maxsplit=1)[0]
    return text.strip().strip("*").strip()


def extract_answer(response: str) -> Optional[str]:
    """The final answer a response gives, as text, or None when it gives none.

    Order: last \\boxed{...} (None if it is unterminated or empty); last "#### x" (GSM8K);
    last "the answer is x"; last number.
    """
    if _BOXED.search(response):
        return last_boxed(response) or None  # a boxed final answer, or none if it was cut off
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(response)
        if found:
            answer = _clean_tail(found[-1])
            if answer:
                return answer
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def gold_text(answer: str) -> str:
    """The gold answer: extracted when the gold is a full solution (\\boxed or ####), else whole."""
    if _BOXED.search(answer) or "####" in answer:
        return extract_answer(answer) or answer.strip()
    return answer.strip()


def as_math(text: str) -> str:
    """Wrap an answer in $...$ so math-verify's LaTeX extractor sees it (no-op if already wrapped)."""
    text = text.strip()
    if len(text) > 1 and text.startswith("$") and text.endswith("$"):
        return text
    return f"${text}$"


def make_math_reward(verify_timeout_s: Optional[float] = 5) -> Callable[[str, str], float]:
    """Build the `math` reward: 1.0 when the extracted answer equals the gold per math-verify, else 0.0.

    verify_timeout_s: math-verify's own limit per parse/compare, in whole seconds (signal.alarm),
    used only in a main thread; None or 0 disables it.
    """
    from math_verify import parse, verify  # import here: only processes that score math pay for it

    alarm_s = int(math.ceil(verify_timeout_s)) if verify_timeout_s else None

    def math_reward(response: str, answer: str) -> float:
        predicted = extract_answer(response)
        if predicted is None:
            return 0.0
        limit = alarm_s if threading.current_thread() is threading.main_thread() else None
        gold = parse(as_math(gold_text(answer)), parsing_timeout=limit)
        if not gold:
            raise ValueError(f"math reward: math-verify could not parse the gold answer {answer!r}")
        target = parse(as_math(predicted), parsing_timeout=limit)
        return 1.0 if verify(gold, target, timeout_seconds=limit) else 0.0

    return math_reward
