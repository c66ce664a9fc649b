"""The degeneracy guard: a warning, during training, that the student's sampled answers have
stopped ending or started looping (`kdrl.degeneracy`), while the run can still be stopped.

A student can lower its per-token reverse KL by collapsing into a degenerate mode (a string of
digits, a repeated word) that the teacher also finds likely once it is there: the loss and
``rollout/reverse_kl`` then look like progress. The guard watches ``rollout/eos_frac`` and
``rollout/repeat_frac`` pooled over the last ``train.guard_patience_steps`` steps (one bad step
is noise; several in a row are a trend) and says so in plain words, once when a limit is
crossed and again only after the answers recovered and crossed it again. It never stops a run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kdrl.config import Config
from kdrl.degeneracy import REPEAT_N

EOS_KEY, REPEAT_KEY = "rollout/eos_frac", "rollout/repeat_frac"

log = logging.getLogger("kdrl")


def crossed(window: Sequence[Mapping[str, float]], cfg: Config) -> dict[str, float]:
    """The limits the steps in ``window`` cross, pooled (every step samples the same number of
    answers, so the mean of the steps' means is the mean over their answers): ``{metric key:
    pooled value}``. Empty while the window is shorter than ``train.guard_patience_steps``."""
    t = cfg.train
    if t.guard_patience_steps == 0 or len(window) < t.guard_patience_steps:
        return {}
    out = {}
    eos, repeat = _pooled(window, EOS_KEY), _pooled(window, REPEAT_KEY)
    if t.guard_min_eos_frac is not None and eos is not None and eos < t.guard_min_eos_frac:
        out[EOS_KEY] = eos
    if (
        t.guard_max_repeat_frac is not None
        and repeat is not None
        and repeat > t.guard_max_repeat_frac
    ):
        out[REPEAT_KEY] = repeat
    return out


def _pooled(window: Sequence[Mapping[str, float]], key: str) -> float | None:
    if not window or any(key not in m for m in window):
        return None
    return sum(m[key] for m in window) / len(window)


def guard_warnings(
    history: Sequence[Mapping[str, float]],
    cfg: Config,
    *,
    step: int,
    teacher: Mapping[str, float] | None = None,
) -> list[str]:
    """Warnings to log after the last step of ``history`` (per-step metrics, oldest first), which
    is training step ``step``: the limits crossed over the last ``train.guard_patience_steps``
    steps that were not crossed over the same number of steps one step earlier. ``teacher``
    holds the teacher's held-out signals (``eval/teacher_eos_frac``, ...) when known."""
    n = cfg.train.guard_patience_steps
    now = crossed(history[-n:] if n else [], cfg)
    before = crossed(history[-n - 1 : -1], cfg) if len(history) > n else {}
    return [guard_message(key, value, cfg, step=step, teacher=teacher or {})
            for key, value in now.items() if key not in before]  # fmt: skip


def guard_message(
    key: str, value: float, cfg: Config, *, step: int, teacher: Mapping[str, float]
) -> str:
    """The warning for limit ``key`` crossed at pooled ``value``: what is happening, in plain
    words, and what to try."""
    n, limit = cfg.train.guard_patience_steps, cfg.rollout.max_new_tokens
    answers = n * cfg.train.batch_size * cfg.rollout.n_samples
    if key == EOS_KEY:
        what = (
            f"sampled answers are not ending: {round(value * answers)} of {answers} over the "
            f"last {n} steps ended with EOS within the {limit}-token limit"
        )
        theirs = teacher.get("eval/teacher_eos_frac")
        setting = f"train.guard_min_eos_frac={cfg.train.guard_min_eos_frac:g}"
        also = "; if the teacher's answers are long too, raise rollout.max_new_tokens"
    else:
        what = (
            f"sampled answers are looping: over the last {n} steps, {value:.0%} of their "
            f"{REPEAT_N}-grams repeat one seen earlier in the same answer"
        )
        theirs = teacher.get("eval/teacher_repeat_frac")
        setting = f"train.guard_max_repeat_frac={cfg.train.guard_max_repeat_frac:g}"
        also = ""
    if theirs is not None:
        what += f" (the teacher's held-out answers: {theirs:.0%})"
    return (
        f"step {step}: {what}. The student may be collapsing into a degenerate mode that lowers "
        f"the reverse KL without learning the task. Try a lower optim.lr (now {cfg.optim.lr:g}), "
        "or a warm start: a student that already answers like the teacher (e.g. fine-tuned on "
        f"the teacher's answers first){also}. (Warned at {setting}; the run goes on.)"
    )


@dataclass
class Guard:
    """The guard's memory across steps: the last ``guard_patience_steps + 1`` steps' signals and
    the teacher's held-out signals once an evaluation measured them."""

    cfg: Config
    enabled: bool = True
    """Log the warnings (`warn`); False on data-parallel ranks other than the first."""
    history: list[dict[str, float]] = field(default_factory=list)
    teacher: dict[str, float] = field(default_factory=dict)

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Take step ``step``'s metrics (an evaluation-only record, as at step 0, just updates
        the teacher's signals); returns the warnings to log now."""
        self.teacher |= {k: v for k, v in metrics.items() if k.startswith("eval/teacher_")}
        if EOS_KEY not in metrics:
            return []
        self.history.append({k: metrics[k] for k in (EOS_KEY, REPEAT_KEY) if k in metrics})
        del self.history[: -self.cfg.train.guard_patience_steps - 1]
        return guard_warnings(self.history, self.cfg, step=step, teacher=self.teacher)

    def warn(self, step: int, metrics: Mapping[str, float]) -> None:
        """`observe`, and log its warnings with the ``kdrl`` logger when enabled."""
        for warning in self.observe(step, metrics):
            if self.enabled:
                log.warning("%s", warning)
