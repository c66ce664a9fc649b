"""The verdict on a run, in plain words: did the student learn the task, and are its answers
still answers?

The per-token reverse KL on the student's own samples is not evidence of learning: it also falls
when the student moves into a degenerate region (a string of digits, a repeated word) that the
teacher finds likely once it is there. So the verdict rests on the task metrics (accuracy and
agreement with the teacher's greedy answers) and on the student's negative log-likelihood of the
teacher's answers, read teacher-forced; the reverse KL is only quoted. Independently, the
student's last answers are checked against the teacher's for degeneracy (`kdrl.degeneracy`).
`report.md`, the demo's terminal summary and the end of ``kdrl train`` all print this verdict.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdrl.config import Config
from kdrl.degeneracy import REPEAT_N

log = logging.getLogger("kdrl")

RATES = (
    ("eval/accuracy_greedy", "greedy accuracy"),
    ("eval/accuracy", "sampled accuracy"),
    ("eval/agreement_greedy", "greedy agreement"),
    ("eval/agreement", "sampled agreement"),
)
"""Task rates (higher is better): metric key, name in the verdict. Agreement is exact agreement
with the teacher's greedy answers."""
NLL = "eval/teacher_nll"
_SAMPLED = ("eval/accuracy", "eval/agreement")

MIN_RATE_GAIN = 0.05
"""An accuracy or agreement improved when it rose by at least 5 points: on the demo's 30
held-out prompts, two answers. One answer either way is what a single borderline prompt or
the sampling of one answer gives."""
MIN_NLL_DROP = 0.05
"""The teacher-forced NLL improved when it fell by at least 5% of its first value. It involves
no sampling, so any change is real, but a smaller one leaves the teacher's answers about as
unlikely to the student as before."""
MIN_EOS_SHARE = 0.5
"""The answers do not end when their EOS rate is below half the teacher's. The teacher's greedy
answers show how often an answer to these prompts fits in the token limit; a student sampling at
the eval temperature may end somewhat less often, but not half as often if it answers like the
teacher (the demo's teacher: 81-97%; its pruned student before training: 0%)."""
MAX_REPEAT_FRAC = 0.3
"""The answers loop when on average at least 30% of their 3-grams repeat an earlier one: a short
natural answer repeats almost none (the demo's teacher: under 1%)."""
REPEAT_OVER_TEACHER = 2.0
"""... and at least twice as many as the teacher's, so that a task whose answers repeat by
nature (lists, tables) is not called degenerate."""
MIN_DISTINCT_SHARE = 0.5
"""The answers draw on few tokens when their distinct-token rate is below half the teacher's
(half of 1 without a teacher): 32 tokens of digits have at most 10 distinct ones (0.31); the
demo teacher's answers 0.94."""


@dataclass(frozen=True)
class Verdict:
    """What the run did, in plain words."""

    learnt: bool | None
    """True: a task metric or the teacher-forced NLL improved; False: none did; None: nothing
    to judge by (one evaluation only, or none of those metrics measured at both ends)."""
    degenerate: tuple[str, ...]
    """Why the last answers look degenerate, in words; empty when they do not."""
    text: str


def verdict(
    first: Mapping[str, Any] | None,
    last: Mapping[str, Any],
    teacher: Mapping[str, Any] | None = None,
    *,
    max_new_tokens: int | None = None,
    greedy_eval: bool = False,
) -> Verdict:
    """The verdict from the first and last evaluation records (``eval/`` metrics; ``first``
    None when there was one evaluation only) and the teacher's signals (``eval/teacher_*``, or
    None without a teacher); ``max_new_tokens`` names the token limit in the text.
    ``greedy_eval``: the answers at ``eval.temperature`` were greedy (temperature 0), so
    ``eval/accuracy`` and ``eval/agreement`` are the greedy ones and are not read twice."""
    keys = [(k, label) for k, label in RATES if not (greedy_eval and k in _SAMPLED)]
    rates = [(label, *pair) for key, label in keys if (pair := _pair(first, last, key))]
    improved = [f"{label} rose from {a:.0%} to {b:.0%}" for label, a, b in rates
                if b - a >= MIN_RATE_GAIN]  # fmt: skip
    not_improved = [f"{label} {a:.0%} -> {b:.0%}" for label, a, b in rates
                    if b - a < MIN_RATE_GAIN]  # fmt: skip
    nll = _pair(first, last, NLL)
    if nll is not None:
        a, b = nll
        if a - b >= MIN_NLL_DROP * a:
            improved.append(f"teacher-forced NLL fell from {a:.3g} to {b:.3g} nats/token")
        else:
            not_improved.append(f"teacher-forced NLL {a:.3g} -> {b:.3g} nats/token")
    learnt = bool(improved) if improved or not_improved else None
    reasons = degeneracy_reasons(last, teacher or {}, max_new_tokens=max_new_tokens)
    kl = _pair(first, last, "eval/reverse_kl")
    kl_drop = (kl[0] - kl[1]) / kl[0] if kl and kl[0] > 0 else 0.0
    kl_fell = (
        f"reverse KL fell {kl_drop:.0%}" if kl_drop >= 0.01 else None
    )  # "fell 0%" says nothing
    if learnt:
        text = "The student learnt: " + "; ".join(improved) + "."
        if reasons:
            text = (f"The student's answers are degenerate ({'; '.join(reasons)}), although "
                    + "; ".join(improved) + ": do not count this run as a success.")  # fmt: skip
        return Verdict(True, tuple(reasons), text)
    if learnt is False:
        measured = _names([label for label, *_ in rates], nll is not None)
        text = "The student did not learn: " + (f"{kl_fell} but " if kl_fell else "")
        text += f"{measured} did not improve ({', '.join(not_improved)})"
    else:
        why = "no accuracy, agreement or teacher-forced NLL was measured at both ends"
        if first is None:
            why = "one evaluation only"
        text = f"Cannot tell whether the student learnt: {why}"
        if kl_fell:
            text += f"; {kl_fell}, which alone does not show learning"
    if reasons:
        text += f"; its answers are degenerate ({'; '.join(reasons)})"
    return Verdict(learnt, tuple(reasons), text + ".")


def degeneracy_reasons(
    last: Mapping[str, Any], teacher: Mapping[str, Any], *, max_new_tokens: int | None = None
) -> list[str]:
    """Plain-words reasons why the answers measured in ``last`` look degenerate next to the
    teacher's (``eval/teacher_*`` in ``teacher``, possibly empty); empty when none applies."""
    reasons = []
    limit = f"the {max_new_tokens}-token limit" if max_new_tokens else "the token limit"
    eos, teacher_eos = _num(last, "eval/eos_frac"), _num(teacher, "eval/teacher_eos_frac")
    if eos is not None and teacher_eos is not None and eos < MIN_EOS_SHARE * teacher_eos:
        reasons.append(f"{eos:.0%} end within {limit} against {teacher_eos:.0%} of the teacher's")
    repeat = _num(last, "eval/repeat_frac")
    teacher_repeat = _num(teacher, "eval/teacher_repeat_frac")
    repeat_limit = max(MAX_REPEAT_FRAC, REPEAT_OVER_TEACHER * (teacher_repeat or 0.0))
    if repeat is not None and repeat >= repeat_limit:
        reasons.append(f"{repeat:.0%} repeated {REPEAT_N}-grams" + _against(teacher_repeat))
    distinct = _num(last, "eval/distinct_frac")
    teacher_distinct = _num(teacher, "eval/teacher_distinct_frac")
    if distinct is not None and distinct < MIN_DISTINCT_SHARE * (teacher_distinct or 1.0):
        reasons.append(
            f"only {distinct:.0%} distinct tokens per answer" + _against(teacher_distinct)
        )
    return reasons


def run_verdict(
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int | None = None,
    greedy_eval: bool = False,
) -> Verdict | None:
    """`verdict` of a run's ``metrics.jsonl`` records: its first and last records with student
    evaluation metrics, and the teacher's signals wherever logged; None without an evaluation."""
    keys = [key for key, _ in RATES] + [NLL, "eval/reverse_kl", "eval/eos_frac"]
    evals = [r for r in records if any(_num(r, k) is not None for k in keys)]
    if not evals:
        return None
    teacher: dict[str, float] = {}
    for r in records:
        for k in r:
            if k.startswith("eval/teacher_") and k not in teacher and _num(r, k) is not None:
                teacher[k] = r[k]
    first = evals[0] if len(evals) > 1 else None
    return verdict(
        first, evals[-1], teacher, max_new_tokens=max_new_tokens, greedy_eval=greedy_eval
    )


def log_verdict(records: Sequence[Mapping[str, Any]], cfg: Config) -> None:
    """Log the verdict of a finished run with config ``cfg`` as ``kdrl train`` ends: a warning
    when the student did not learn or its answers degenerated."""
    found = run_verdict(records, max_new_tokens=cfg.rollout.max_new_tokens,
                        greedy_eval=cfg.eval.temperature == 0)  # fmt: skip
    if found is not None:
        healthy = found.learnt is not False and not found.degenerate
        (log.info if healthy else log.warning)("verdict: %s", found.text)


def _num(record: Mapping[str, Any] | None, key: str) -> float | None:
    """The finite number at ``key``, else None (absent, null, or not a number)."""
    value = None if record is None else record.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _pair(first, last, key: str) -> tuple[float, float] | None:
    a, b = _num(first, key), _num(last, key)
    return None if a is None or b is None else (a, b)


def _against(teacher_value: float | None) -> str:
    return "" if teacher_value is None else f" against {teacher_value:.0%} of the teacher's"


def _names(rate_labels: list[str], nll: bool) -> str:
    """ "accuracy, agreement and teacher-forced NLL" for what was measured."""
    names = [n for n in ("accuracy", "agreement") if any(n in label for label in rate_labels)]
    names += ["teacher-forced NLL"] if nll else []
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
