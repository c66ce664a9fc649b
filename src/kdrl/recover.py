"""What a run that failed keeps: a checkpoint of its last completed step, so that ``--resume``
continues once the cause is fixed, or a plain reason why none can be written.

A step that fails before its optimizer update is rewound as a stop request would abandon it
(data position and RNG states back to where it began), so the resumed run is the one that never
failed. After an optimizer step the weights match no completed step; under ``torchrun`` a failing
rank cannot gather them; before the first step there is nothing to keep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdrl.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    restore_rng_state,
)
from kdrl.metrics import METRICS_FILE, MetricsWriter

if TYPE_CHECKING:
    from kdrl.train import Run

log = logging.getLogger("kdrl")


@dataclass
class StepStart:
    """What a step starts from, kept so that a failure can still save the last completed step."""

    step: int
    optimizer_steps: int
    """The scheduler's count of optimizer steps: unchanged means the weights are untouched."""
    rng: dict
    sampler: dict
    metrics: dict[str, float] | None = None
    """The step's training metrics while they are not yet in metrics.jsonl."""

    @classmethod
    def capture(cls, run: Run) -> StepStart:
        return cls(
            run.step, run.scheduler.last_epoch, capture_rng_state(), run.sampler.state_dict()
        )


def keep_after_failure(
    run: Run,
    began: StepStart | None,
    last_saved: int,
    writer: MetricsWriter,
    *,
    save: Callable[[Run], Path | None],
) -> None:
    """An error ended the run: write a checkpoint of the last completed step, so that
    ``--resume`` continues once the cause is fixed, or say exactly why none can be written.
    The caller re-raises the error, whose message is then the last line."""
    out = run.output_dir
    if run.ctx.enabled:
        newest = find_latest_checkpoint(out)
        log.error("under torchrun a failing rank cannot gather the weights: no checkpoint was "
                  "written after the error; the newest is %s", newest)  # fmt: skip
        return
    if began is not None and run.step == began.step:
        if run.scheduler.last_epoch != began.optimizer_steps:
            log.error(
                "step %d failed after an optimizer step had changed the weights: they match no "
                "completed step, so no checkpoint was written; the newest is %s",
                run.step + 1, find_latest_checkpoint(out),
            )  # fmt: skip
            return
        # Failed before its update: the step never happened, as when a stop abandons it.
        restore_rng_state(began.rng)
        run.sampler.load_state_dict(began.sampler)
    elif began is not None and began.metrics is not None:
        writer.write(run.step, began.metrics)  # trained, but its evaluation failed
    if run.step == 0:
        (out / METRICS_FILE).unlink(missing_ok=True)  # so that the same command starts over
        log.error("the run failed before its first step was done: nothing to save; once the "
                  "cause is fixed, run the same command again")  # fmt: skip
        return
    if last_saved != run.step:
        try:
            save(run)
        except CheckpointError as err:
            log.error("the run failed, and so did saving step %d: %s", run.step, err)
            return
    log.error(
        "the run failed after step %d; its checkpoint is %s: once the cause is fixed, the same "
        "command with --resume continues from it", run.step, checkpoint_path(out, run.step),
    )  # fmt: skip
