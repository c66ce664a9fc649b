"""Task rewards: ``fn(completion, reference_answer) -> float``, built in or imported by name.

Built-ins score 1.0 for a correct answer and 0.0 otherwise: `gsm8k` (final number of a GSM8K
solution), `math` (any answer `math_verify` can parse, e.g. ``\\boxed{\\frac{1}{2}}``) and
`exact_match` (stripped strings). `get_reward_fn` resolves `reward.fn`; `compute_rewards` calls
it over a batch and turns any failure into a `RewardError` that says which prompt and completion.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import cast

from kdrl.config.validate import ConfigError

RewardFn = Callable[[str, str | None], float]
"""``fn(completion text, reference answer or None) -> reward``."""

# A number as written in prose: optional sign, thousands commas, decimals ("-1,234.5").
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_MATH_TIMEOUT_S = 5


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""


def _timeout_s() -> int | None:
    # math_verify bounds sympy with `signal.alarm`, which only works in the main thread; in any
    # other thread (e.g. a rollout worker) the bound has to go or every call would raise.
    return _MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_equal(reference: str, candidate: str) -> bool | None:
    """`math_verify` equivalence of two answers; None when either does not parse."""
    from math_verify import parse, verify  # sympy-heavy: imported on first use

    timeout = _timeout_s()
    gold = parse(reference, parsing_timeout=timeout)
    pred = parse(candidate, parsing_timeout=timeout)
    if not gold or not pred:
        return None
    return verify(gold, pred, timeout_seconds=timeout)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces matched; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed{") - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i]
    return None  # unclosed: the completion was cut off mid-answer


def gsm8k_final_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution: the text after its last ``####``, commas
    removed; a reference without ``####`` is taken whole (e.g. an answer column of numbers)."""
    _, _, tail = solution.rpartition("####")
    return tail.replace(",", "").strip()


def gsm8k_model_answer(completion: str) -> str | None:
    """The model's answer: the last ``\\boxed{}``, else the number after the last ``####``,
    else the last number in the text; commas removed. None when there is none."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.replace(",", "").strip()
    if "####" in completion:
        match = _NUMBER.search(completion.rpartition("####")[2])
        if match:
            return match.group().replace(",", "")
    numbers_found = _NUMBER.findall(completion)
    return numbers_found[-1].replace(",", "") if numbers_found else None


def _numeric_equal(reference: str, candidate: str) -> bool:
    """Fallback when `math_verify` cannot parse: compare the last numbers, exactly."""
    ref, cand = _NUMBER.findall(reference), _NUMBER.findall(candidate)
    if not ref or not cand:
        return False
    return Decimal(ref[-1].replace(",", "")) == Decimal(cand[-1].replace(",", ""))


def _require_answer(name: str, answer: str | None) -> str:
    if answer is None:
        raise ValueError(f"the {name} reward needs a reference answer; set data.answer_field")
    return answer


def gsm8k_reward(completion: str, answer: str | None) -> float:
    """1.0 when the model's final number equals the GSM8K reference, else 0.0."""
    reference = gsm8k_final_answer(_require_answer("gsm8k", answer))
    candidate = gsm8k_model_answer(completion)
    if not candidate:
        return 0.0
    equal = _math_equal(reference, candidate)
    if equal is None:
        equal = _numeric_equal(reference, candidate)
    return 1.0 if equal else 0.0


def math_reward(completion: str, answer: str | None) -> float:
    """1.0 when `math_verify` finds the completion's answer equivalent to the reference."""
    return 1.0 if _math_equal(_require_answer("math", answer), completion) else 0.0


def exact_match_reward(completion: str, answer: str | None) -> float:
    """1.0 when the stripped completion equals the stripped reference."""
    return 1.0 if completion.strip() == _require_answer("exact_match", answer).strip() else 0.0


def contains_reward(completion: str, answer: str | None) -> float:
    """1.0 when one of the reference's ``|``-separated alternatives appears in the completion as
    whole words, ignoring case (``Paris``, ``7|seven``); for short factual answers."""
    text = completion.lower()
    for alternative in _require_answer("contains", answer).split("|"):
        words = alternative.strip().lower()
        if words and re.search(rf"(?<![\w.]){re.escape(words)}(?![\w]|\.\d)", text):
            return 1.0
    return 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    "exact_match": exact_match_reward,
    "contains": contains_reward,
}


def get_reward_fn(spec: str) -> RewardFn | None:
    """`reward.fn` as a function: ``none`` (None), a built-in name, or ``package.module:fn``."""
    if spec == "none":
        return None
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    choices = f"one of none, {', '.join(BUILTIN_REWARDS)}, or package.module:function"
    module_name, colon, attr_path = spec.partition(":")
    if not colon or not module_name or not attr_path:
        close = difflib.get_close_matches(spec, ["none", *BUILTIN_REWARDS], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"reward.fn must be {choices}, got {spec!r}{hint}")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as err:  # not found, or the module itself fails (SyntaxError, NameError)
        raise ConfigError(
            f"reward.fn {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward.fn {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward.fn {spec!r} is a {type(obj).__name__}, not a function")
    return cast(RewardFn, obj)


CHECK_ROWS = 3
"""Rows `check_reward_fn` tries before training (two calls each)."""


def check_reward_fn(fn: RewardFn, spec: str, answers: list[tuple[str, str | None]]) -> None:
    """Call the reward function once before training, on the first rows' reference answers
    (``answers``: (row as errors name it, answer)), as a completion equal to the reference and
    as an empty one: a wrong signature, a missing `data.answer_field` or a function that fails
    on its own data is found at start-up, not after the first step's rollout."""
    try:
        inspect.signature(fn).bind("completion", "answer")
    except TypeError as err:
        raise ConfigError(
            f"reward.fn {spec!r} must take (completion, answer) and return a number: {err}"
        ) from err
    except ValueError:  # a builtin or C function without a signature: the calls below tell
        pass
    for where, answer in answers:
        for completion in (answer or "", ""):
            try:
                value = fn(completion, answer)
            except Exception as err:
                raise ConfigError(
                    f"reward.fn {spec!r} fails on {where} (reference {answer!r}, completion "
                    f"{completion!r}) before training: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(
                    f"reward.fn {spec!r} returned {value!r} on {where}, not a finite number"
                )


def compute_rewards(
    fn: RewardFn,
    completions: list[str],
    answers: list[str | None],
    prompt_indices: list[int],
    *,
    sources: list[str] | None = None,
) -> list[float]:
    """``fn(completion, answer)`` for each completion; a failure names the prompt index and,
    given ``sources`` (each completion's `Prompt.where`, e.g. ``p.jsonl line 3``), its row."""
    sources = sources or [""] * len(completions)
    assert len(completions) == len(answers) == len(prompt_indices) == len(sources)
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    name = f"{module}:{qualname}" if module and qualname else repr(fn)  # as reward.fn names it
    rewards = []
    rows = zip(completions, answers, prompt_indices, sources, strict=True)
    for completion, answer, index, source in rows:
        at = f"{source}, " if source else ""
        where = f"reward function {name} on prompt {index} ({at}completion {completion[:80]!r})"
        try:
            value = fn(completion, answer)
        except Exception as err:
            raise RewardError(f"{where} raised {type(err).__name__}: {err}") from err
        # bool and numpy scalars are Real; a tensor or a string is not.
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"{where} returned {value!r}, not a finite number")
        rewards.append(float(value))
    return rewards
