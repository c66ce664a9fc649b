"""Built-in rewards, `reward.fn` resolution and the batch wrapper's error reporting."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from kdrl.config.validate import ConfigError
from kdrl.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    compute_rewards,
    exact_match_reward,
    get_reward_fn,
    gsm8k_final_answer,
    gsm8k_model_answer,
    gsm8k_reward,
    math_reward,
)

GSM8K_MINI = Path(__file__).parent / "data" / "gsm8k_mini.jsonl"
SOLUTION = "He has 3 * 14 = <<3*14=42>>42 hens.\nIn total 42 + 14 = <<42+14=56>>56.\n#### 56"


def test_reference_answers_of_the_mini_set():
    rows = [json.loads(line) for line in GSM8K_MINI.read_text().splitlines()]
    finals = [gsm8k_final_answer(row["answer"]) for row in rows]
    assert finals == ["29", "23", "210", "216", "28", "35", "2250", "12", "56", "16", "1680", "4"]
    assert gsm8k_final_answer("  1,234 ") == "1234"  # a bare answer column


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{56} apples, not 57", "56"),  # boxed beats a later number
        ("\\boxed{\\frac{1}{2}} then 3", "\\frac{1}{2}"),  # nested braces
        ("#### 1,680\nChecked in 3 steps.", "1680"),  # after ####, not the last number
        ("It is 12 then 7.5 liters.", "7.5"),
        ("-3 degrees", "-3"),
        ("\\boxed{12", "12"),  # an unclosed box falls back to the numbers
        ("no digits here", None),
    ],
)
def test_model_answer_extraction(completion, expected):
    assert gsm8k_model_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("42 hens and 14 cows make 56 animals.", 1.0),
        ("The total is \\boxed{56}.", 1.0),
        ("14 + 42\n#### 56", 1.0),
        ("#### 56.0", 1.0),
        ("\\boxed{\\$56}", 1.0),  # math_verify cannot parse it; the numeric fallback can
        ("The total is 55.", 0.0),
        ("\\boxed{-56}", 0.0),
        ("\\boxed{56} is wrong, \\boxed{57}", 0.0),  # the last box counts
        ("I do not know.", 0.0),
        ("", 0.0),
    ],
)
def test_gsm8k_reward(completion, reward):
    assert gsm8k_reward(completion, SOLUTION) == reward


def test_gsm8k_reward_with_thousands_commas():
    assert gsm8k_reward("That is 2,250 bottles.", "9 * 250 = 2250\n#### 2,250") == 1.0
    assert gsm8k_reward("\\boxed{2,250}", "#### 2250") == 1.0
    assert gsm8k_reward("That is 2,205 bottles.", "#### 2,250") == 0.0


def test_gsm8k_reward_needs_an_answer():
    with pytest.raises(ValueError, match=r"data\.answer_field"):
        gsm8k_reward("#### 5", None)


def test_math_and_exact_match():
    assert math_reward("So x = \\boxed{\\frac{1}{2}}.", "0.5") == 1.0
    assert math_reward("So x = \\boxed{\\frac{1}{3}}.", "0.5") == 0.0
    assert math_reward("no answer", "\\frac{1}{2}") == 0.0
    assert exact_match_reward("  Paris\n", "Paris") == 1.0
    assert exact_match_reward("paris", "Paris") == 0.0


def test_math_rewards_work_outside_the_main_thread():
    # math_verify's default timeout uses signal.alarm, which raises in any other thread.
    results: list[float] = []
    errors: list[BaseException] = []

    def score() -> None:
        try:
            results.append(gsm8k_reward("\\boxed{56}", SOLUTION))
            results.append(math_reward("\\boxed{0.5}", "\\frac{1}{2}"))
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert errors == [] and results == [1.0, 1.0]


# --- get_reward_fn -----------------------------------------------------------------------------


def test_builtins_and_none():
    assert get_reward_fn("none") is None
    for name, fn in BUILTIN_REWARDS.items():
        assert get_reward_fn(name) is fn


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"reward.fn must be one of none, gsm8k, math, exact"):
        get_reward_fn("gsm9k")


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "kdrl_test_rewards_mod.py").write_text(
        "def length_reward(completion, answer):\n"
        "    return float(len(completion))\n"
        "\n"
        "class Scorer:\n"
        "    @staticmethod\n"
        "    def score(completion, answer):\n"
        "        return 1.0 if answer in completion else 0.0\n"
        "\n"
        "THRESHOLD = 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "kdrl_test_rewards_mod"


def test_custom_module_function(reward_module):
    fn = get_reward_fn(f"{reward_module}:length_reward")
    assert fn is not None and fn("abcd", None) == 4.0
    method = get_reward_fn(f"{reward_module}:Scorer.score")
    assert method is not None and method("x = 7", "7") == 1.0


@pytest.mark.parametrize(
    ("suffix", "pattern"),
    [
        (":missing", r"has no attribute 'missing'"),
        (":THRESHOLD", r"is a float, not a function"),
    ],
)
def test_custom_attribute_errors(reward_module, suffix, pattern):
    with pytest.raises(ConfigError, match=rf"reward.fn '{reward_module}{suffix}'.*{pattern}"):
        get_reward_fn(reward_module + suffix)


def test_custom_import_error():
    with pytest.raises(ConfigError, match=r"reward.fn 'no_such_pkg_kdrl.mod:f': cannot import"):
        get_reward_fn("no_such_pkg_kdrl.mod:f")
    with pytest.raises(ConfigError, match=r"reward\.fn must be"):
        get_reward_fn("pkg.mod:")


# --- compute_rewards ---------------------------------------------------------------------------


def test_compute_rewards_calls_each_pair():
    rewards = compute_rewards(exact_match_reward, ["a", "b", " a"], ["a", "a", "a"], [0, 0, 1])
    assert rewards == [1.0, 0.0, 1.0]
    assert compute_rewards(lambda c, a: c == "y", ["y", "n"], [None, None], [3, 4]) == [1.0, 0.0]


def test_exception_names_prompt_and_completion_start():
    completion = "A" * 80 + "B" * 40

    def broken(c: str, a: str | None) -> float:
        if c == "fine":
            return 0.5
        raise KeyError("boom")

    with pytest.raises(RewardError, match=r"prompt 17 .*'A{80}'\).*KeyError") as info:
        compute_rewards(broken, ["fine", completion], ["x", "x"], [16, 17])
    assert "B" not in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_builtin_without_answer_is_a_reward_error():
    with pytest.raises(RewardError, match=r"gsm8k_reward on prompt 2") as info:
        compute_rewards(gsm8k_reward, ["#### 5"], [None], [2])
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("value", [math.nan, math.inf, "1.0", None])
def test_non_finite_or_non_numeric_return(value):
    with pytest.raises(RewardError, match=r"prompt 5 .* not a finite number"):
        compute_rewards(lambda c, a: value, ["c"], [None], [5])


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The capital of France is Paris.", "Paris", 1.0),
        ("7 + 5 = 12", "12", 1.0),
        ("12 times 3 is 32.", "36", 0.0),
        ("It is 120.", "12", 0.0),  # whole numbers only
        ("3.14 is pi", "3", 0.0),
        ("A parisian cafe", "Paris", 0.0),  # whole words only
        ("There are SEVEN days.", "7|seven", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_contains_reward(completion, answer, expected):
    assert get_reward_fn("contains")(completion, answer) == expected
