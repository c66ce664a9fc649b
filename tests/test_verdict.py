"""The verdict on a run: learnt, did not learn, degenerate, no teacher, missing metrics."""

from __future__ import annotations

import pytest

from kdrl.verdict import (
    MAX_REPEAT_FRAC,
    MIN_NLL_DROP,
    MIN_RATE_GAIN,
    degeneracy_reasons,
    run_verdict,
    verdict,
)

TEACHER = {
    "eval/teacher_accuracy": 0.5,
    "eval/teacher_eos_frac": 0.97,
    "eval/teacher_repeat_frac": 0.01,
    "eval/teacher_distinct_frac": 0.9,
}
HEALTHY = {"eval/eos_frac": 0.8, "eval/repeat_frac": 0.02, "eval/distinct_frac": 0.85}
BEFORE = {
    "eval/accuracy_greedy": 0.0, "eval/accuracy": 0.0, "eval/agreement_greedy": 0.0,
    "eval/agreement": 0.0, "eval/teacher_nll": 9.0, "eval/reverse_kl": 9.57, **HEALTHY,
}  # fmt: skip
# make demo's end: reverse KL down 92%, nothing else better, answers a string of digits.
DIGITS = {
    **BEFORE, "eval/teacher_nll": 9.4, "eval/reverse_kl": 0.804, "eval/eos_frac": 0.0,
    "eval/repeat_frac": 0.61, "eval/distinct_frac": 0.3,
}  # fmt: skip


def test_did_not_learn_and_degenerate_says_so_plainly():
    v = verdict(BEFORE, DIGITS, TEACHER, max_new_tokens=32)
    assert v.learnt is False and len(v.degenerate) == 3
    assert v.text == (
        "The student did not learn: reverse KL fell 92% but accuracy, agreement and "
        "teacher-forced NLL did not improve (greedy accuracy 0% -> 0%, sampled accuracy 0% -> "
        "0%, greedy agreement 0% -> 0%, sampled agreement 0% -> 0%, teacher-forced NLL 9 -> "
        "9.4 nats/token); its answers are degenerate (0% end within the 32-token limit against "
        "97% of the teacher's; 61% repeated 3-grams against 1% of the teacher's; only 30% "
        "distinct tokens per answer against 90% of the teacher's)."
    )
    assert "improve" not in v.text.replace("did not improve", "")


def test_learnt():
    after = {**BEFORE, "eval/accuracy_greedy": 0.3, "eval/teacher_nll": 4.5,
             "eval/reverse_kl": 1.2}  # fmt: skip
    v = verdict(BEFORE, after, TEACHER, max_new_tokens=32)
    assert v.learnt is True and v.degenerate == ()
    assert v.text == (
        "The student learnt: greedy accuracy rose from 0% to 30%; teacher-forced NLL fell from "
        "9 to 4.5 nats/token."
    )


@pytest.mark.parametrize(
    ("change", "learnt"),
    [
        ({"eval/accuracy": MIN_RATE_GAIN}, True),
        ({"eval/accuracy": MIN_RATE_GAIN - 0.01}, False),
        ({"eval/agreement_greedy": MIN_RATE_GAIN}, True),
        ({"eval/teacher_nll": 9.0 * (1 - MIN_NLL_DROP)}, True),
        ({"eval/teacher_nll": 9.0 * (1 - MIN_NLL_DROP / 2)}, False),
        # The reverse KL alone never counts, however far it falls.
        ({"eval/reverse_kl": 0.01}, False),
    ],
)
def test_what_counts_as_learning(change, learnt):
    assert verdict(BEFORE, {**BEFORE, **change}, TEACHER).learnt is learnt


def test_learnt_but_degenerate_is_not_called_a_success():
    after = {**DIGITS, "eval/accuracy_greedy": 0.1}
    v = verdict(BEFORE, after, TEACHER, max_new_tokens=32)
    assert v.learnt is True and len(v.degenerate) == 3
    assert v.text.startswith("The student's answers are degenerate (0% end within the 32-token")
    assert v.text.endswith(
        "although greedy accuracy rose from 0% to 10%: do not count this run as a success."
    )


def test_degeneracy_is_judged_against_the_teacher():
    # Half the teacher's EOS rate is the line: 0.49 of 0.97 is below it, 0.49 of 0.9 is not.
    assert degeneracy_reasons({"eval/eos_frac": 0.48}, TEACHER) == [
        "48% end within the token limit against 97% of the teacher's"
    ]
    assert degeneracy_reasons({"eval/eos_frac": 0.49}, {"eval/teacher_eos_frac": 0.9}) == []
    # Repeats: at least MAX_REPEAT_FRAC and twice the teacher's; a repetitive teacher excuses it.
    assert degeneracy_reasons({"eval/repeat_frac": MAX_REPEAT_FRAC}, TEACHER)
    assert not degeneracy_reasons({"eval/repeat_frac": MAX_REPEAT_FRAC - 0.01}, TEACHER)
    assert not degeneracy_reasons({"eval/repeat_frac": 0.5}, {"eval/teacher_repeat_frac": 0.3})
    assert not degeneracy_reasons({"eval/distinct_frac": 0.46}, TEACHER)  # 0.45 is half of 0.9
    assert degeneracy_reasons({"eval/distinct_frac": 0.44}, TEACHER)
    assert degeneracy_reasons(HEALTHY, TEACHER) == []


def test_no_teacher():
    """GRPO alone: no agreement, NLL, reverse KL or teacher signals; the EOS rate has nothing to
    be compared with, while repeats and distinct tokens still have absolute limits."""
    before = {"eval/accuracy_greedy": 0.2, "eval/accuracy": 0.1, **HEALTHY}
    after = {"eval/accuracy_greedy": 0.2, "eval/accuracy": 0.12, "eval/eos_frac": 0.0,
             "eval/repeat_frac": 0.7, "eval/distinct_frac": 0.2}  # fmt: skip
    v = verdict(before, after, None, max_new_tokens=16)
    assert v.learnt is False
    assert v.text == (
        "The student did not learn: accuracy did not improve (greedy accuracy 20% -> 20%, "
        "sampled accuracy 10% -> 12%); its answers are degenerate (70% repeated 3-grams; only "
        "20% distinct tokens per answer)."
    )
    assert verdict(before, {**before, "eval/accuracy_greedy": 0.4}, None).text == (
        "The student learnt: greedy accuracy rose from 20% to 40%."
    )


def test_missing_metrics():
    # No task metric at both ends: it cannot tell, and says that the reverse KL is not evidence.
    v = verdict({"eval/reverse_kl": 2.0}, {"eval/reverse_kl": 1.0, **HEALTHY}, TEACHER)
    assert v.learnt is None and v.degenerate == ()
    assert v.text == (
        "Cannot tell whether the student learnt: no accuracy, agreement or teacher-forced NLL was "
        "measured at both ends; reverse KL fell 50%, which alone does not show learning."
    )
    # A metric present at one end only is not compared; null (non-finite) counts as missing.
    first = {"eval/accuracy": 0.0, "eval/teacher_nll": None}
    v = verdict(first, {"eval/accuracy": 0.0, "eval/teacher_nll": 1.0, "eval/agreement": 1.0})
    assert v.learnt is False
    assert (
        v.text == "The student did not learn: accuracy did not improve (sampled accuracy 0% -> 0%)."
    )
    # One evaluation only.
    v = verdict(None, DIGITS, TEACHER)
    assert v.learnt is None and v.text.startswith(
        "Cannot tell whether the student learnt: one evaluation only; its answers are degenerate"
    )


def test_a_greedy_evaluation_is_not_read_twice():
    # At eval.temperature 0, eval/accuracy is the greedy accuracy again, not a sampled one.
    after = {**BEFORE, "eval/accuracy_greedy": 0.2, "eval/accuracy": 0.2}
    assert verdict(BEFORE, after).text == (
        "The student learnt: greedy accuracy rose from 0% to 20%; sampled accuracy rose from 0% "
        "to 20%."
    )
    assert verdict(BEFORE, after, greedy_eval=True).text == (
        "The student learnt: greedy accuracy rose from 0% to 20%."
    )


def test_run_verdict_reads_a_metrics_file():
    records = [
        {"step": 0, **BEFORE, **TEACHER},
        {"step": 1, "loss/total": 1.0, "rollout/eos_frac": 0.0},
        {"step": 2, **DIGITS, "eval/teacher_eos_frac": 0.5},  # a resumed run's own measurement
    ]
    v = run_verdict(records, max_new_tokens=32)
    assert v == verdict(BEFORE, DIGITS, TEACHER, max_new_tokens=32)  # the first teacher value
    assert run_verdict(records[:2]) == verdict(None, records[0], TEACHER)
    assert run_verdict([{"step": 1, "loss/total": 1.0}]) is None
