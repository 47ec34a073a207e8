"""Reward functions: answer extraction, math-verify verdicts, format, exact, user rewards, weights."""

import sys
import threading
import types
from pathlib import Path

import pytest
from math_verify import parse, verify

from system.rewards import build_reward, extract_answer, make_reward
from system.rewards.math_answer import as_math, gold_text, last_boxed

REPO_ROOT = Path(__file__).resolve().parents[2]
USER = "tests.data.user_rewards"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # so `tests.data.user_rewards` imports


# (gold, response, obvious verdict or None when only math-verify's verdict is checked)
MATH_CASES = [
    ("0.5", "So the probability is \\boxed{\\frac{1}{2}}.", 1.0),
    ("\\frac{1}{2}", "The answer is 0.5.", 1.0),
    ("1/2", "\\boxed{\\frac{1}{2}}", 1.0),
    ("5", "The side length is \\boxed{5 \\text{ cm}}", None),
    ("5 cm", "#### 5", None),
    ("5", "\\boxed{5\\,\\mathrm{cm}}", None),
    ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", 1.0),
    ("18", "She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18", 1.0),
    ("18", "#### 17", 0.0),
    ("4", "\\boxed{3}", 0.0),
    ("\\frac{\\sqrt{3}}{2}", "Thus $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("1000", "The answer is 1,000.", 1.0),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}", 1.0),
    ("42", "It is either 41 or 42", 1.0),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}", 1.0),
    ("2", "First \\boxed{1}, then correcting: \\boxed{2}", 1.0),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", 1.0),
    ("10", "The answer is: **10**", 1.0),
    ("3", "x = \\boxed{-3}", 0.0),
    ("0.5", "\\boxed{\\frac{1}{3}}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    # a GSM8K gold solution: its "#### 72" is the gold
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "\\boxed{72}", 1.0),
]


@pytest.fixture(scope="module")
def math_reward():
    return make_reward("math")


@pytest.mark.parametrize("gold, response, obvious", MATH_CASES)
def test_math_reward_agrees_with_math_verify(math_reward, gold, response, obvious):
    extracted = extract_answer(response)
    assert extracted is not None
    expected = float(verify(parse(as_math(gold_text(gold))), parse(as_math(extracted))))
    assert math_reward(response, gold) == expected
    if obvious is not None:
        assert expected == obvious


def test_math_reward_without_an_answer_is_zero(math_reward):
    assert math_reward("I do not know.", "42") == 0.0
    assert math_reward("so it is \\boxed{12", "12") == 0.0  # truncated box: no answer


def test_math_reward_bad_gold_raises(math_reward):
    with pytest.raises(ValueError, match="gold"):
        math_reward("\\boxed{1}", "")


def test_math_reward_off_the_main_thread(math_reward):
    """math-verify's signal-based timeouts fail off the main thread; we switch them off there."""
    out = []
    thread = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac12}", "0.5")))
    thread.start()
    thread.join()
    assert out == [1.0]


@pytest.mark.parametrize("text, boxed", [
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("a \\boxed{1} b \\boxed{ {x}^{2} } c", "{x}^{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\frac{1}{2}", None),
    ("no box", None),
])
def test_last_boxed_balances_braces(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("response, answer", [
    ("work...\n#### 1,234", "1,234"),
    ("So the final answer is 3.5. Let me check again: 2 + 1.5", "3.5"),
    ("The answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$"),
    ("we get 12 apples, then 7 - 2 = -5", "-5"),
    ("ratio 3/4", "3/4"),
    ("nothing numeric", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_format_reward_presets_and_regex():
    boxed = make_reward("format")
    assert boxed("so \\boxed{3}", "") == 1.0
    assert boxed("so 3", "") == 0.0
    think = make_reward("format", pattern="think")
    assert think("<think>\n2+2 is 4\n</think>\nThe answer is 4", "") == 1.0
    assert think("The answer is 4 <think>x</think>", "") == 0.0
    assert think("<think>no answer after</think>", "") == 0.0
    custom = make_reward("format", pattern=r"^answer: \d+$", flags="im")
    assert custom("thinking\nANSWER: 12", "") == 1.0
    assert custom("answer: twelve", "") == 0.0


def test_exact_delegates_to_the_synthetic_task(monkeypatch):
    fake = types.ModuleType("system.data.synthetic")
    fake.exact_reward = lambda response, answer: 0.25 if response == answer else 0.5
    monkeypatch.setitem(sys.modules, "system.data.synthetic", fake)
    exact = make_reward("exact")
    assert exact("7", "7") == 0.25
    assert exact("7", "8") == 0.5


def test_exact_with_the_real_synthetic_task():
    pytest.importorskip("system.data.synthetic")
    exact = make_reward("exact")
    assert exact(" 12\n", "12") == 1.0
    assert exact("13", "12") == 0.0


def test_user_reward_module_function_with_kwargs():
    fn = make_reward(f"{USER}:length_reward", scale=0.5)
    assert fn("abcd", "") == 2.0


@pytest.mark.parametrize("spec, message", [
    (f"{USER}_missing:length_reward", "cannot import module"),
    (f"{USER}:no_such_function", "has no attribute 'no_such_function'"),
    (f"{USER}:NOT_CALLABLE", "not a callable"),
    (f"{USER}:", "expected 'package.module:function'"),
])
def test_user_reward_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        make_reward(spec)
    assert repr(spec) in str(err.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_reward([{"name": "maths", "weight": 1.0}])
    text = str(err.value)
    assert "'maths'" in text and "'math'" in text and "'format'" in text and "'exact'" in text


@pytest.mark.parametrize("spec, message", [
    ({"name": "math", "wieght": 1.0}, "unknown keys"),
    ({"weight": 1.0}, "missing 'name'"),
    ({"name": "math", "weight": float("nan")}, "finite"),
    ({"name": "format", "kwargs": {"patern": "boxed"}}, "bad kwargs"),
    ({"name": "format", "kwargs": {"pattern": "(unclosed"}}, "invalid regex"),
    ({"name": "format", "kwargs": {"flags": "sq"}}, "unknown regex flags"),
])
def test_bad_specs_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward([spec])
    with pytest.raises(ValueError, match="at least one"):
        build_reward([])


def test_weighted_combination():
    reward = build_reward([
        {"name": "math", "weight": 1.0},
        {"name": "format", "weight": 0.2},
        {"name": "format", "weight": -0.1, "kwargs": {"pattern": "think"}},
        {"name": f"{USER}:length_reward", "weight": 0.01, "kwargs": {"scale": 1.0}},
    ])
    response = "so \\boxed{4}"  # 12 characters
    total, parts = reward(response, "4")
    assert parts == {"math": 1.0, "format": 1.0, "format_2": 0.0, "length_reward": 12.0}
    assert total == pytest.approx(1.0 + 0.2 + 0.0 + 0.12)
    total, parts = reward("so \\boxed{5}", "4")
    assert total == pytest.approx(0.2 + 0.12)


def test_config_dataclass_specs_are_accepted():
    config = pytest.importorskip("system.config")
    reward = build_reward([config.RewardSpec(name="format", weight=2.0, kwargs={"pattern": "boxed"})])
    assert reward("\\boxed{1}", "1") == (2.0, {"format": 1.0})


def test_non_finite_reward_is_an_error():
    reward = build_reward([{"name": f"{USER}:nan_reward"}])
    with pytest.raises(ValueError, match="nan"):
        reward("x", "y")
