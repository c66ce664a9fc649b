"""The run directory: refuse to mix two runs in one folder, and refuse to resume a run with a
different configuration unless told to."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kdrl.checkpoint import find_latest_checkpoint
from kdrl.config import Config, config_to_dict, load_config

log = logging.getLogger("kdrl")

# Keys a resumed run may change: how long and how often, and what is measured or warned
# about, not what is trained.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.epochs", "train.save_every_steps", "train.keep_checkpoints",
    "train.tensorboard", "train.wandb", "train.threads", "train.device", "train.parallel",
    "train.skip_nonfinite", "train.max_skipped_steps",
    "train.guard_patience_steps", "train.guard_min_eos_frac", "train.guard_max_repeat_frac",
    "eval.every_steps",
    "eval.max_prompts",
    "eval.greedy",
}  # fmt: skip


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new``."""
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def prepare_output_dir(
    cfg: Config, *, resume: bool, force: bool = False, restart: bool = False
) -> Path:
    """Create (or check, when resuming) ``train.output_dir`` and return it. ``restart`` starts a
    run over in a folder that holds one: its files move to ``previous-<time>/`` inside it."""
    out = Path(cfg.train.output_dir)
    if force and not resume:
        raise ValueError("--force only applies with --resume (it accepts a changed config)")
    if resume and restart:
        raise ValueError("--resume continues a run and --restart starts it over: pass one")
    holds_run = (out / "checkpoints").exists() or (out / "metrics.jsonl").exists()
    latest = find_latest_checkpoint(out) if holds_run or resume else None
    if resume:
        if latest is None and not holds_run:
            raise ValueError(f"--resume: no complete checkpoint in {out}/checkpoints: no run there")
        if latest is None:
            raise ValueError(
                f"--resume: no complete checkpoint in {out}/checkpoints (the run ended before "
                f"it saved one); pass --restart instead to start it over ({_MOVED})"
            )
        saved = out / "config.yaml"
        if saved.exists() and not force:
            changes = [
                c for c in config_changes(load_config(saved), cfg)
                if c.split(":")[0] not in RESUMABLE_CHANGES
            ]  # fmt: skip
            if changes:
                raise ValueError(
                    f"--resume with a config that differs from {saved}: "
                    + "; ".join(changes)
                    + " (pass --force to resume anyway)"
                )
    elif restart and out.is_dir() and any(_run_files(out)):
        _move_aside(out)
    elif holds_run:
        if latest is None:
            raise ValueError(
                f"train.output_dir {str(out)!r} holds a run with no complete checkpoint: pass "
                f"--restart to start it over ({_MOVED}), or choose another train.output_dir"
            )
        raise ValueError(
            f"train.output_dir {str(out)!r} already holds a run: pass --resume to continue it "
            f"from {latest.name}, --restart to start it over ({_MOVED}), or choose another "
            "train.output_dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"train.output_dir {str(out)!r} is not writable: {err}") from err
    if not os.access(out, os.W_OK):
        raise ValueError(f"train.output_dir {str(out)!r} is not writable")
    return out


_PREVIOUS = "previous-"
_MOVED = f"its files move to {_PREVIOUS}<time>/ inside it"


def _run_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if not p.name.startswith(_PREVIOUS)]


def _move_aside(out: Path) -> Path:
    """Move a run's files into ``out/previous-<time>/``: nothing of it is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out / f"{_PREVIOUS}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = out / f"{_PREVIOUS}{stamp}-{n}"
    target.mkdir()
    for path in _run_files(out):
        if path != target:
            path.rename(target / path.name)
    log.warning("--restart: the previous run's files are now in %s", target)
    return target


STATUS_FILE = "status.json"


def write_status(out: Path, *, state: str, step: int, planned: int, reason: str = "") -> None:
    """``status.json``: how the run ended (``finished``, ``stopped`` or ``failed``), after which
    step of how many planned, and why, for ``kdrl report``. Rewritten at every end."""
    status = {"state": state, "step": step, "planned": planned, "reason": reason}
    (out / STATUS_FILE).write_text(json.dumps(status) + "\n", encoding="utf-8")


def read_status(out: Path) -> dict | None:
    """What `write_status` wrote, or None (a run still going, or older than status files)."""
    try:
        return json.loads((out / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
