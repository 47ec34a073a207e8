"""Synthetic multi-step arithmetic task with verifiable answers, for the local debug mode.

Format. A prompt is an expression of `n_terms` integer operands in 0..max_operand joined by
operators drawn from `ops`, followed by "=". No spaces, no chat template. The response is the
answer followed by the model's EOS token:

    prompt "7+5-3="      answer "9"      response "9<|endoftext|>"
    prompt "4-8-6="      answer "-10"
    prompt "2+3*4-5="    answer "9"      (ops="+-*": the usual precedence, * before + and -)

Answers are canonical decimal integers: optional "-", no leading zeros. Every example also holds a
`solution`, the text the warm start is trained to write after the prompt. By default it is the bare
answer. With show_steps=True it is the worked chain, the expression rewritten one operation at a
time (the leftmost "*", else the leftmost operator) down to the answer, e.g. "7+5-3=" ->
"12-3=9". The chain makes supervised learning much faster, but early on about a third of a tiny
model's correct final answers then come with a wrong step, and rewarding those makes GRPO slow, so
the debug run uses bare answers.

With single-digit operands every prompt of one difficulty has the same length (2 * n_terms
characters), so the debug pipeline never depends on how prompts are padded.

Splits. `make_task` draws distinct prompts with a seeded RNG; the held-out split and the train
split never share a prompt. The same seed and difficulty always give the same splits.

Rewards. `exact_reward(response, answer)` is 1.0 when the response's final answer equals the target,
else 0.0. The final answer is read from the text before the first EOS/pad marker or newline: what
follows its last "=" (all of it when there is none), surrounding whitespace ignored; it must be an
integer. Decode responses with special tokens kept, so that text after EOS is never read.
"""

from __future__ import annotations

import itertools
import random
import re

# Every character any difficulty can produce; the debug tokenizer is built over exactly these.
VOCAB_CHARS = "0123456789+-*="

# Text that ends a response: the debug tokenizer's EOS and pad tokens, and a newline.
_STOP_MARKERS = ("<|endoftext|>", "<pad>", "\n")
_INTEGER = re.compile(r"-?\d+")
# Above this many possible prompts, sample with rejection instead of enumerating them all.
_ENUMERATE_LIMIT = 200_000


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Value of operands[0] op[0] operands[1] ... with * binding tighter than + and -."""
    terms = [operands[0]]  # running sum of signed products
    for op, x in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op == "+":
            terms.append(x)
        elif op == "-":
            terms.append(-x)
        else:
            raise ValueError(f"unknown operator {op!r}")
    return sum(terms)


def solution_steps(operands: list[int], operators: list[str]) -> str:
    """The worked solution: the expression rewritten one operation at a time, then the answer."""
    operands, operators, steps = list(operands), list(operators), []
    while operators:
        i = operators.index("*") if "*" in operators else 0
        operands[i : i + 2] = [evaluate(operands[i : i + 2], operators[i : i + 1])]
        del operators[i]
        if operators:
            steps.append(_expression(operands, operators) + "=")
    return "".join(steps) + str(operands[0])


def _expression(operands: list[int], operators: list[str]) -> str:
    return str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:]))


def _example(operands: tuple[int, ...], operators: tuple[str, ...], show_steps: bool) -> dict:
    operands, operators = list(operands), list(operators)
    answer = str(evaluate(operands, operators))
    return {
        "prompt": _expression(operands, operators) + "=",
        "solution": solution_steps(operands, operators) if show_steps else answer,
        "answer": answer,
    }


def make_task(
    seed: int = 0,
    n_train: int = 3000,
    n_eval: int = 400,
    n_terms: int = 3,
    max_operand: int = 9,
    ops: str = "+-",
    show_steps: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, heldout) lists of {"prompt": str, "solution": str, "answer": str}.

    Difficulty: `n_terms` operands (>= 2) in 0..`max_operand`, operators from `ops` (subset of "+-*");
    the solution is the bare answer, or with show_steps the worked chain (see the module docstring).
    Raises ValueError when more distinct prompts are asked for than the difficulty allows.
    The defaults are the debug run's task (data.synthetic in system/config.py, whose defaults a
    test holds equal to these).
    """
    if n_terms < 2 or max_operand < 1 or not ops or set(ops) - set("+-*"):
        raise ValueError(f"bad difficulty: n_terms={n_terms} max_operand={max_operand} ops={ops!r}")
    n_values, n_ops = max_operand + 1, len(set(ops))
    space = n_values**n_terms * n_ops ** (n_terms - 1)
    need = n_train + n_eval
    if need > space:
        raise ValueError(f"asked for {need} distinct prompts but this difficulty has only {space}")

    rng = random.Random(seed)
    ops = "".join(sorted(set(ops)))  # order-independent, so "+-" and "-+" give the same task
    if space <= _ENUMERATE_LIMIT:
        every = itertools.product(
            itertools.product(range(n_values), repeat=n_terms),
            itertools.product(ops, repeat=n_terms - 1),
        )
        chosen = rng.sample(list(every), need)
    else:
        seen: set = set()
        chosen = []
        while len(chosen) < need:
            operands = tuple(rng.randint(0, max_operand) for _ in range(n_terms))
            operators = tuple(rng.choice(ops) for _ in range(n_terms - 1))
            if (operands, operators) not in seen:
                seen.add((operands, operators))
                chosen.append((operands, operators))
    examples = [_example(operands, operators, show_steps) for operands, operators in chosen]
    return examples[n_eval:], examples[:n_eval]


def extract_answer(response: str) -> str | None:
    """The canonical integer a response ends with, or None when it is not well formed.

    Reads the text before the first EOS/pad marker or newline, takes what follows its last "="
    (all of it when there is no "="), strips whitespace, and requires an integer.
    """
    for marker in _STOP_MARKERS:
        response = response.split(marker, 1)[0]
    response = response.rsplit("=", 1)[-1].strip()
    if not _INTEGER.fullmatch(response):
        return None
    return str(int(response))


def exact_reward(response: str, answer: str) -> float:
    """1.0 when the response's answer equals the target integer, else 0.0."""
    got = extract_answer(response)
    return 1.0 if got is not None and got == extract_answer(answer) else 0.0
