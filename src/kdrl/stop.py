"""Stopping a training run cleanly on SIGTERM or SIGINT (preemption, ``scancel``, Ctrl-C).

The first signal only sets a flag; the run stops at the next safe point, writes a checkpoint
(none if it stops before its first step: there is nothing to keep), logs how to resume and
raises :class:`Stopped`, which ``kdrl train`` turns into exit status 0. The handler also puts
back the default action of both signals, so a second one ends the process at once, even inside
a long C call; committed checkpoints stay valid (:mod:`kdrl.checkpoint` writes them atomically).
(Python runs a handler in the main thread between bytecodes: two signals that both arrive
within one long C call, e.g. one forward pass, count as one.)

Safe points:

- between steps, :meth:`StopRequest.agreed`: under ``torchrun`` one ``MAX`` all-reduce of the
  flag, so every rank stops after the same step;
- inside the long loops of a step that has not yet reached its update (HF generation, local
  teacher micro-batches) and of evaluation, :func:`abandon_point`: raises :class:`StepAbandoned`
  and the loop drops the step. :func:`rewind_on_abandon` puts back the data position and the RNG
  states the step started from (the weights and optimizer are untouched before the update), so
  a resumed run redoes that step exactly. Only a single process abandons: ranks see a signal at
  different moments and cannot agree mid-step without a collective, so under ``torchrun`` a run
  always finishes its current step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kdrl.metrics import METRICS_FILE

if TYPE_CHECKING:
    from kdrl.distributed import DistContext
# kdrl.checkpoint and kdrl.distributed (torch) are imported where used: the command line
# imports this module for every command.

log = logging.getLogger("kdrl")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StepAbandoned(Exception):
    """A stop was requested before the current step's update: the step is dropped."""


class Stopped(Exception):
    """Raised by ``kdrl.train.train`` after a signal stopped the run and its checkpoint was
    written (``checkpoint`` None: stopped before the first step, nothing to keep). The command
    line exits with status 0."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """Set by the first SIGTERM or SIGINT while installed (see :func:`handle_stop_signals`)."""

    def __init__(self, *, abandon: bool, announce: bool = True) -> None:
        self.abandon = abandon
        """Whether abandon points may drop a step (a single process only)."""
        self.announce = announce
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def agreed(self, ctx: DistContext) -> bool:
        """Whether to stop before the next step: true on every rank if any rank was signalled
        (a rank that was not takes the signal's name). A collective under ``torchrun``: every
        rank calls it at every step boundary."""
        from kdrl.distributed import all_reduce

        if not ctx.enabled:
            return self.requested
        # The reduced value, not this rank's flag: a signal that lands after this rank's
        # contribution counts at the next boundary, on every rank alike.
        signum = int(all_reduce([float(self.signum or 0)], ctx, "max")[0])
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0

    def finish(
        self, step: int, total: int, checkpoint: Path | None, output_dir: Path, *, main: bool
    ) -> NoReturn:
        """End a stopped run: log (``main``: rank 0) where it stopped and how to go on, then
        raise :class:`Stopped`. ``checkpoint`` None: stopped before its first step, with nothing
        worth keeping; rank 0 removes the run's ``metrics.jsonl`` so that the same command
        starts it over."""
        if checkpoint is None and main:
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
            log.warning(
                "stopped by %s before the first step: nothing to save; run the same command "
                "again (without --resume) to start over", self.name,
            )  # fmt: skip
        elif main:
            log.warning(
                "stopped by %s after step %d of %d; checkpoint %s; to continue, run the same "
                "command with --resume (kdrl train ... --resume)",
                self.name, step, total, checkpoint,
            )  # fmt: skip
        raise Stopped(self.name, step, checkpoint)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The next signal takes the default action: the process ends at once.
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.signum = signum
        if self.announce:
            # os.write, not logging: a handler may run while the logging lock is held.
            message = (
                f"\nkdrl: {self.name} received: stopping at the next safe point and saving a "
                "checkpoint; send it again to exit at once\n"
            )
            with contextlib.suppress(OSError):  # no stderr (a closed descriptor)
                os.write(2, message.encode())


_active: StopRequest | None = None


@contextmanager
def handle_stop_signals(*, abandon: bool, announce: bool = True) -> Iterator[StopRequest]:
    """Route SIGTERM and SIGINT to a new :class:`StopRequest` for the duration of the block,
    then restore the previous handlers. Outside the main thread (where Python cannot install
    handlers) the signals keep their handlers and the request is never set."""
    global _active
    request = StopRequest(abandon=abandon, announce=announce)
    if threading.current_thread() is not threading.main_thread():
        log.debug("not the main thread: SIGTERM/SIGINT keep their handlers")
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    outer, _active = _active, request
    try:
        for sig in SIGNALS:
            signal.signal(sig, request._on_signal)
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _active = outer


def may_abandon() -> bool:
    """Whether a step in progress may be abandoned if a stop is requested (a single process
    with the handlers installed)."""
    return _active is not None and _active.abandon


def abandoning() -> bool:
    """True once a stop was requested and the step in progress may be abandoned."""
    return _active is not None and _active.abandon and _active.requested


def abandon_point() -> None:
    """Raise :class:`StepAbandoned` if a stop was requested and abandoning is allowed."""
    if abandoning():
        raise StepAbandoned(f"stop requested ({_active.name})")


def skippable(fn: Callable[..., dict], *args: Any, what: str) -> dict:
    """``fn(*args)``, or ``{}`` when a stop request abandons it (e.g. an evaluation after the
    step's update: the step is kept, its evaluation is skipped and logged as such)."""
    try:
        return fn(*args)
    except StepAbandoned:
        log.warning("stop requested: %s skipped", what)
        return {}


@contextmanager
def rewind_on_abandon(sampler, step: int) -> Iterator[None]:
    """If the block (training step ``step``) raises :class:`StepAbandoned`, restore the global
    RNG states and the ``sampler`` position from before it, then re-raise: the step never
    happened."""
    from kdrl.checkpoint import capture_rng_state, restore_rng_state

    if not may_abandon():
        yield
        return
    rng, position = capture_rng_state(), sampler.state_dict()
    try:
        yield
    except StepAbandoned:
        restore_rng_state(rng)
        sampler.load_state_dict(position)
        log.warning("stop requested: step %d abandoned before its update; a resume redoes it", step)
        raise
