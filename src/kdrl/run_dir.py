"""The run directory: refuse to mix two runs in one folder, and refuse to resume a run with a
different configuration unless told to."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from kdrl.checkpoint import find_latest_checkpoint
from kdrl.config import Config, config_to_dict, load_config

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


def prepare_output_dir(cfg: Config, *, resume: bool, force: bool = False) -> Path:
    """Create (or check, when resuming) ``train.output_dir`` and return it."""
    out = Path(cfg.train.output_dir)
    if resume:
        if find_latest_checkpoint(out) is None:
            raise ValueError(f"--resume: no complete checkpoint in {out}/checkpoints")
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
    elif (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        raise ValueError(
            f"train.output_dir {str(out)!r} already holds a run: pass --resume to continue it, "
            "or choose another train.output_dir"
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
