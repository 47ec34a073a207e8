"""The synthetic arithmetic task: deterministic, disjoint splits, correct answers, exact reward."""

import ast
import operator

import pytest

from system.data.synthetic import VOCAB_CHARS, exact_reward, extract_answer, make_task, solution_steps

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _reference_value(expression: str) -> int:
    """Evaluate with Python's own parser: an implementation independent of the module's."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # a negative step result
            return -walk(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("difficulty", [{}, {"n_terms": 4, "ops": "+-*"}, {"n_terms": 2, "max_operand": 30}])
def test_same_seed_same_splits_and_other_seed_differs(difficulty):
    assert make_task(3, 200, 50, **difficulty) == make_task(3, 200, 50, **difficulty)
    assert make_task(3, 200, 50, **difficulty) != make_task(4, 200, 50, **difficulty)


@pytest.mark.parametrize("difficulty", [{}, {"n_terms": 4, "ops": "+-*"}, {"n_terms": 2, "max_operand": 30}])
def test_splits_have_requested_sizes_and_share_no_prompt(difficulty):
    train, heldout = make_task(0, 1000, 300, **difficulty)
    assert (len(train), len(heldout)) == (1000, 300)
    train_prompts, heldout_prompts = {ex["prompt"] for ex in train}, {ex["prompt"] for ex in heldout}
    assert len(train_prompts) == 1000 and len(heldout_prompts) == 300
    assert not train_prompts & heldout_prompts


def test_large_difficulty_uses_sampling_and_stays_disjoint():
    train, heldout = make_task(1, 2000, 500, n_terms=6, ops="+-*")  # 10**6 * 3**5 prompts
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in heldout}


@pytest.mark.parametrize("difficulty", [{}, {"n_terms": 4, "ops": "+-*"}, {"n_terms": 2, "max_operand": 30}])
def test_answers_match_an_independent_evaluation(difficulty):
    train, heldout = make_task(7, 500, 100, **difficulty)
    for ex in train + heldout:
        assert ex["prompt"].endswith("=")
        assert set(ex["prompt"] + ex["answer"]) <= set(VOCAB_CHARS)
        assert ex["answer"] == str(_reference_value(ex["prompt"][:-1]))
        assert ex["solution"] == ex["answer"]
        assert exact_reward(ex["solution"] + "<|endoftext|>", ex["answer"]) == 1.0


@pytest.mark.parametrize("difficulty", [{}, {"n_terms": 4, "ops": "+-*"}, {"n_terms": 5, "ops": "*-"}])
def test_worked_solutions_take_one_true_step_at_a_time(difficulty):
    train, _ = make_task(7, 500, 10, show_steps=True, **difficulty)
    for ex in train:
        steps = [ex["prompt"][:-1]] + ex["solution"].split("=")
        assert len(steps) == sum(ex["prompt"].count(op) for op in "+-*") + 1  # one step per operator
        for before, after in zip(steps, steps[1:]):
            assert _reference_value(after) == _reference_value(before)  # each step keeps the value
            assert len(after) < len(before)
        assert steps[-1] == ex["answer"]
        assert exact_reward(ex["solution"], ex["answer"]) == 1.0
        assert set(ex["solution"]) <= set(VOCAB_CHARS)


def test_worked_solution_examples():
    assert solution_steps([7, 5, 3], ["+", "-"]) == "12-3=9"
    assert solution_steps([2, 3, 4, 5], ["+", "*", "-"]) == "2+12-5=14-5=9"
    assert solution_steps([1, 2, 3], ["-", "*"]) == "1-6=-5"
    assert solution_steps([4, 5], ["+"]) == "9"


def test_default_prompts_all_have_the_same_length():
    train, heldout = make_task(0, 500, 100)
    assert {len(ex["prompt"]) for ex in train + heldout} == {6}


def test_asking_for_more_prompts_than_exist_is_an_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        make_task(0, 90, 20, n_terms=2, ops="+")  # only 100 prompts exist


@pytest.mark.parametrize(
    "response, expected",
    [
        ("9", "9"),
        ("9<|endoftext|>", "9"),
        ("9<|endoftext|><pad><pad>", "9"),
        ("  -12 \n", "-12"),
        ("-12<|endoftext|>7", "-12"),  # text after EOS is never read
        ("12-3=9<|endoftext|>", "9"),  # worked solutions: the answer follows the last "="
        ("12-3=9<|endoftext|>=5", "9"),
        ("12-3=", None),
        ("12-3", None),
        ("09", "9"),
        ("-0", "0"),
        ("", None),
        ("<|endoftext|>", None),
        ("9+", None),
        ("=9", "9"),
        ("--3", None),
        ("1-2", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_exact_reward_right_wrong_and_malformed():
    assert exact_reward("9<|endoftext|>", "9") == 1.0
    assert exact_reward("9 \n", "9") == 1.0
    assert exact_reward("-10<|endoftext|><pad>", "-10") == 1.0
    assert exact_reward("8<|endoftext|>", "9") == 0.0
    assert exact_reward("10", "-10") == 0.0
    assert exact_reward("9=", "9") == 0.0
    assert exact_reward("", "9") == 0.0
    assert exact_reward("<unk>9", "9") == 0.0
