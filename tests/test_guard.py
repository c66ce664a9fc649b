"""The degeneracy guard's trigger logic, a pure function of the per-step metrics history."""

from __future__ import annotations

import logging

import pytest

from kdrl.config import load_config
from kdrl.guard import EOS_KEY, REPEAT_KEY, Guard, crossed, guard_warnings


def config(*extra: str):
    return load_config(None, [
        "train.guard_patience_steps=3", "train.guard_min_eos_frac=0.1",
        "train.guard_max_repeat_frac=0.5", "train.batch_size=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=32", "optim.lr=1e-4", *extra,
    ])  # fmt: skip


def steps(eos: list[float], repeat: list[float] | None = None) -> list[dict[str, float]]:
    repeat = repeat or [0.0] * len(eos)
    return [{EOS_KEY: e, REPEAT_KEY: r} for e, r in zip(eos, repeat, strict=True)]


def replay(history: list[dict[str, float]], cfg, teacher=None) -> list[tuple[int, str]]:
    """(step, warning) for every warning, as the loop would log them after each step."""
    return [(t, w) for t in range(1, len(history) + 1)
            for w in guard_warnings(history[:t], cfg, step=t, teacher=teacher)]  # fmt: skip


def test_healthy_answers_never_warn():
    assert replay(steps([0.75, 1.0, 0.5, 0.75, 1.0, 0.25], [0.1, 0.0, 0.2, 0.4, 0.0, 0.1]),
                  config()) == []  # fmt: skip


def test_warns_once_when_crossed_and_again_after_recovering():
    history = steps([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75, 1.0, 1.0, 0.0, 0.0, 0.0])
    warned = replay(history, config())
    # Steps 2-4 are the first window of 3 below 10%: warned at 4, not again while it stays
    # there; steps 7-9 recover; 10-12 cross again.
    assert [t for t, _ in warned] == [4, 12]
    assert all("not ending" in w for _, w in warned)


def test_limits_are_pooled_over_the_window_and_need_a_full_window():
    cfg = config()
    assert crossed(steps([0.0, 0.0]), cfg) == {}  # 2 steps < patience 3
    assert crossed(steps([0.0, 0.0, 0.25]), cfg) == {EOS_KEY: pytest.approx(0.25 / 3)}
    assert crossed(steps([0.0, 0.25, 0.25]), cfg) == {}  # 1/6 of the answers ended: enough
    assert crossed(steps([1.0] * 3, [0.5, 0.5, 0.5]), cfg) == {}  # at the limit is not past it
    assert crossed(steps([1.0] * 3, [0.5, 0.5, 0.6]), cfg) == {REPEAT_KEY: pytest.approx(1.6 / 3)}


def test_each_check_and_the_guard_turn_off():
    degenerate = steps([0.0] * 4, [0.9] * 4)
    assert set(crossed(degenerate, config())) == {EOS_KEY, REPEAT_KEY}
    assert set(crossed(degenerate, config("train.guard_min_eos_frac=null"))) == {REPEAT_KEY}
    assert set(crossed(degenerate, config("train.guard_max_repeat_frac=null"))) == {EOS_KEY}
    assert replay(degenerate, config("train.guard_patience_steps=0")) == []


def test_messages_say_what_happens_and_what_to_try():
    cfg = config()
    teacher = {"eval/teacher_eos_frac": 0.97, "eval/teacher_repeat_frac": 0.01}
    (step, eos), (_, loop) = replay(steps([0.0, 0.0, 0.25], [0.7, 0.6, 0.8]), cfg, teacher)
    assert step == 3
    assert eos.startswith("step 3: sampled answers are not ending: 1 of 12 over the last 3 steps")
    assert "ended with EOS within the 32-token limit (the teacher's held-out answers: 97%)" in eos
    assert "lower optim.lr (now 0.0001)" in eos and "warm start" in eos
    assert "rollout.max_new_tokens" in eos and "train.guard_min_eos_frac=0.1" in eos
    assert "looping: over the last 3 steps, 70% of their 3-grams repeat" in loop
    assert "(the teacher's held-out answers: 1%)" in loop and "max_new_tokens" not in loop
    # Without the teacher's numbers the message leaves them out.
    assert "teacher's held-out" not in replay(steps([0.0] * 3), cfg)[0][1]


def test_guard_object_keeps_the_teachers_signals_and_a_short_history():
    guard = Guard(config())
    # An evaluation-only record (step 0) only brings the teacher's signals.
    assert guard.observe(0, {"eval/teacher_eos_frac": 0.9, "eval/accuracy": 0.5}) == []
    assert guard.history == [] and guard.teacher == {"eval/teacher_eos_frac": 0.9}
    warned = [w for t in range(1, 7) for w in guard.observe(t, {EOS_KEY: 0.0, REPEAT_KEY: 0.0,
                                                                 "loss/total": 1.0})]  # fmt: skip
    assert len(warned) == 1 and "(the teacher's held-out answers: 90%)" in warned[0]
    assert len(guard.history) == 4 and guard.history[-1] == {EOS_KEY: 0.0, REPEAT_KEY: 0.0}


def test_only_an_enabled_guard_logs(caplog):
    degenerate = {EOS_KEY: 0.0, REPEAT_KEY: 0.0}
    for enabled in (False, True):
        guard = Guard(config(), enabled=enabled)
        with caplog.at_level(logging.WARNING, logger="kdrl"):
            for step in range(1, 5):
                guard.warn(step, degenerate)
    assert [(r.name, r.levelname) for r in caplog.records] == [("kdrl", "WARNING")]
    assert caplog.records[0].getMessage().startswith("step 3: sampled answers are not ending")
