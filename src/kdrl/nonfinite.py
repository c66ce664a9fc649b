"""Non-finite losses and gradient norms: what was found, the error, and the trainer's choice
between stopping and skipping the optimizer step (`train.skip_nonfinite`).

`kdrl.update.policy_update` checks before every optimizer step and never steps on a nan/inf;
this module decides what happens next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kdrl.config.schema import TrainConfig

log = logging.getLogger("kdrl")


@dataclass(frozen=True)
class NonFinite:
    """A nan/inf met before an optimizer step."""

    metric: str
    """The offending value as the metrics name it: a loss term (``loss/kd``, ``loss/grpo``),
    ``loss/total`` (finite terms whose weighted sum is not), or ``optim/grad_norm``."""
    value: float
    minibatch: int
    """1-based index of the minibatch (optimizer step) within the update."""
    n_minibatches: int
    elsewhere: bool = False
    """The loss was finite on this data-parallel rank and non-finite on another."""

    def __str__(self) -> str:
        text = f"{self.metric} = {self.value}"
        if self.elsewhere:
            text = f"{self.metric} on another data-parallel rank"
        if self.n_minibatches > 1:
            text += f" in minibatch {self.minibatch} of {self.n_minibatches}"
        return text


class NonFiniteError(RuntimeError):
    """A loss or gradient norm was nan/inf; raised before the optimizer touches the weights."""

    def __init__(self, message: str, found: NonFinite):
        super().__init__(message)
        self.found = found


def skip_or_stop(
    found: NonFinite, *, step: int, skipped: int, train: TrainConfig, warn: bool = True
) -> int:
    """Training step ``step`` (1-based, as logged) met ``found`` before an optimizer step, with
    ``skipped`` optimizer steps skipped so far. Raise `NonFiniteError`, or, under
    ``train.skip_nonfinite``, log a warning (when ``warn``) and return the new count; past
    ``train.max_skipped_steps`` skipped steps, raise naming that limit."""
    kept = "checkpoints and metrics of earlier steps are kept"
    if not train.skip_nonfinite:
        raise NonFiniteError(
            f"step {step}: non-finite {found}; stopped before the optimizer step ({kept}); "
            "set train.skip_nonfinite=true to skip such steps instead",
            found,
        )
    skipped += 1
    if skipped > train.max_skipped_steps:
        raise NonFiniteError(
            f"step {step}: non-finite {found}; {skipped} optimizer steps skipped, more than "
            f"train.max_skipped_steps={train.max_skipped_steps}: the run stops ({kept})",
            found,
        )
    if warn:
        log.warning(
            "step %d: non-finite %s; optimizer step skipped (%d so far, at most "
            "train.max_skipped_steps=%d)", step, found, skipped, train.max_skipped_steps,
        )  # fmt: skip
    return skipped
