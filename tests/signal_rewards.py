"""A reward function for tests/test_signals.py (``reward.fn=signal_rewards:exact_match``): the
built-in exact match, plus hooks that place a signal at a known point of a run, counted in the
run's own reward calls, so that no test races a sleep against the machine's speed.

Calls are counted from the first training call (kdrl's start-up check of the reward function
comes first and is not counted).

- ``hold``: while the file named by ``$KDRL_TEST_HOLD_FILE`` exists, each call from the
  ``$KDRL_TEST_HOLD_AT``-th on (default: the first) writes ``<file>.held`` and waits until the
  file is removed (at most ``HOLD_LIMIT_S``), so a test can signal a training process that is
  known to be busy at that exact call.
- ``signal_at``: ``(prefix, n)``: the ``n``-th call whose reference answer starts with
  ``prefix`` sends SIGTERM to this very process. In-process runs set it with :func:`reset`; a
  ``kdrl train`` subprocess reads ``$KDRL_TEST_SIGNAL_AT`` (``prefix:n``), and with
  ``$KDRL_TEST_SIGNAL_RANK`` set only the torchrun worker of that rank signals itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from kdrl.rewards import CHECK_ROWS, exact_match_reward

HOLD_ENV = "KDRL_TEST_HOLD_FILE"
HOLD_AT_ENV = "KDRL_TEST_HOLD_AT"
SIGNAL_AT_ENV = "KDRL_TEST_SIGNAL_AT"
SIGNAL_RANK_ENV = "KDRL_TEST_SIGNAL_RANK"
HOLD_LIMIT_S = 300.0
CHECK_CALLS = 2 * CHECK_ROWS
"""Calls kdrl makes before training to try the reward function: not counted by the hooks."""


def _signal_at_from_env() -> tuple[str, int] | None:
    spec = os.environ.get(SIGNAL_AT_ENV)
    rank = os.environ.get(SIGNAL_RANK_ENV)
    if not spec or (rank is not None and os.environ.get("RANK") != rank):
        return None
    prefix, n = spec.rsplit(":", 1)
    return prefix, int(n)


signal_at: tuple[str, int] | None = _signal_at_from_env()
_seen = 0  # calls counted for signal_at
_calls = 0  # all calls, for the hold


def exact_match(completion: str, answer: str | None) -> float:
    global _seen, _calls
    _calls += 1
    if _calls <= CHECK_CALLS:
        return exact_match_reward(completion, answer)
    hold = os.environ.get(HOLD_ENV)
    if (
        hold
        and _calls - CHECK_CALLS >= int(os.environ.get(HOLD_AT_ENV, "1"))
        and Path(hold).exists()
    ):
        Path(hold + ".held").write_text(str(os.getpid()))
        deadline = time.monotonic() + HOLD_LIMIT_S
        while Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if signal_at is not None and (answer or "").startswith(signal_at[0]):
        _seen += 1
        if _seen == signal_at[1]:
            os.kill(os.getpid(), signal.SIGTERM)
    return exact_match_reward(completion, answer)


def reset(at: tuple[str, int] | None = None) -> None:
    global signal_at, _seen, _calls
    signal_at, _seen, _calls = at, 0, 0
