"""A reward function for tests/test_signals.py (``reward.fn=signal_rewards:exact_match``): the
built-in exact match, plus two hooks that let a test place a signal at a known point of a run.

- ``hold``: while the file named by ``$KDRL_TEST_HOLD_FILE`` exists, each call writes
  ``<file>.held`` and waits until the file is removed (at most ``HOLD_LIMIT_S``), so a test can
  signal a training process that is known to be busy mid-step.
- ``signal_at``: in-process runs set it to ``(prefix, n)``; the ``n``-th call whose reference
  answer starts with ``prefix`` sends SIGTERM to this very process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from kdrl.rewards import exact_match_reward

HOLD_ENV = "KDRL_TEST_HOLD_FILE"
HOLD_LIMIT_S = 300.0
signal_at: tuple[str, int] | None = None
_seen = 0


def exact_match(completion: str, answer: str | None) -> float:
    global _seen
    hold = os.environ.get(HOLD_ENV)
    if hold and Path(hold).exists():
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
    global signal_at, _seen
    signal_at, _seen = at, 0
