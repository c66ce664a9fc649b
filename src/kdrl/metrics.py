"""Per-step metrics: ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases.

``OUTPUT_DIR/metrics.jsonl`` holds one JSON object per step, ``{"step": N, "loss/total": ...}``.
JSON has no NaN or infinity, so a non-finite value is written as ``null`` and its key is listed
under ``"nonfinite"`` in the same line. On resume the file is cut back to the checkpoint's step,
and TensorBoard is told to hide later events, so a resumed run never shows a step twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_MODES = ("off", "offline", "online")
_RESERVED = ("step", "nonfinite")


class MetricsWriter:
    """Write each step's metrics to every enabled sink; a no-op when `enabled` is False
    (non-zero data-parallel ranks), so only one process touches the run directory.

    `resume_step` None starts the run over: an existing ``metrics.jsonl`` is emptied and old
    TensorBoard events are hidden. With a step, lines after it are dropped (atomically).
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        tensorboard: bool,
        wandb: Literal["off", "offline", "online"],
        config: dict,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        if wandb not in WANDB_MODES:
            raise ValueError(f"train.wandb must be one of {WANDB_MODES}, got {wandb!r}")
        # Checked on every rank, so that all ranks stop together instead of rank 0 alone.
        if wandb != "off" and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                f"train.wandb={wandb} but wandb is not installed: "
                "`pip install kdrl[wandb]`, or set train.wandb=off"
            )
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb_run = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        _truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._tb = _open_tensorboard(Path(output_dir) / TENSORBOARD_DIR, resume_step)
        if wandb != "off":
            self._wandb_run = _open_wandb(Path(output_dir), wandb, config, resume_step)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one line to ``metrics.jsonl`` (flushed) and log the scalars everywhere."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        values = _as_floats(metrics)
        record: dict[str, Any] = {"step": step}
        nonfinite = [key for key, value in values.items() if not math.isfinite(value)]
        record.update({k: (None if k in nonfinite else v) for k, v in values.items()})
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)
            # A killed run should not lose the last two minutes of curves to the writer's queue.
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of the run directory holding one).

    A torn last line (the process died mid-write) is skipped with a warning; any other
    unreadable line is a `ValueError` naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            torn = number == len(lines) and not text.endswith("\n")
            if torn:
                logger.warning("%s: ignoring torn last line %d", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step'")
        records.append(record)
    return records


def format_metrics(metrics: Mapping[str, float], keys: Mapping[str, str] | Sequence[str]) -> str:
    """A short summary such as ``reward 0.50 rkl 1.23`` for a progress-bar postfix.

    `keys` maps metric keys to labels, or lists keys labelled by their last ``/`` part;
    keys absent from `metrics` are left out.
    """
    labels = keys if isinstance(keys, Mapping) else {k: k.rsplit("/", 1)[-1] for k in keys}
    parts = []
    for key, label in labels.items():
        if key in metrics:
            parts.append(f"{label} {_short(float(metrics[key]))}")
    return " ".join(parts)


def _short(value: float) -> str:
    if value == 0 or (math.isfinite(value) and 1e-2 <= abs(value) < 1e4):
        return f"{value:.2f}"
    return f"{value:.2e}" if math.isfinite(value) else str(value)


def _as_floats(metrics: Mapping[str, float]) -> dict[str, float]:
    values = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key in _RESERVED:
            raise ValueError(f"metric key {key!r} is not a string or is reserved ({_RESERVED})")
        try:
            values[key] = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metric {key!r} is not a number: {value!r}") from err
    return values


def _truncate_metrics(path: Path, resume_step: int | None) -> None:
    """Keep only lines with step <= resume_step (none for a fresh run); temp file + rename, so a
    crash here leaves the old file or the new one."""
    if not path.exists():
        return
    kept = []
    if resume_step is not None:
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record) + "\n" for record in kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _open_tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events at or after it that earlier (crashed or replaced) runs left here.
    purge_step = 0 if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _open_wandb(output_dir: Path, mode: str, config: dict, resume_step: int | None) -> Any:
    import wandb

    wandb_dir = output_dir / WANDB_DIR
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # One W&B run per run directory: a resumed run continues the same W&B run.
    id_file = wandb_dir / "run_id"
    if resume_step is not None and id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = wandb.util.generate_id()
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "kdrl"),
        name=output_dir.name,
        id=run_id,
        resume="allow",
        dir=str(wandb_dir),
        mode=mode,
        config=config,
    )
