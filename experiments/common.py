"""A small harness shared by the experiments: command line, seeds, timing, curves, tables, plots.

Nothing here knows about a particular experiment. An experiment script builds its arms, calls
:func:`seed_all` before each (arm, seed), times its training steps with a :class:`Clock`,
records evaluation points as :class:`Curve` objects, and writes what it measured with
:func:`markdown_table`, :func:`plot_curves` and :func:`write_results` into its run folder.

CPU time is the process's user + system time (``resource.getrusage``), which on a shared
machine measures the work done; wall time also counts the waits for a busy core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def parse_args(
    name: str,
    description: str,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--seeds N --out DIR --quick``, the same for every experiment; ``extra`` adds an
    experiment's own options."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"exp-{name}",
                        help="run folder for results.json, results.md and the plots")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="the small configuration the CI test runs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch, and run torch on one thread with deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Accumulates wall and CPU seconds over the spans it times (``with clock: ...``), so that
    evaluation between training steps can be left out of a run's cost."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._start: tuple[float, float] | None = None

    def __enter__(self) -> Clock:
        self._start = (time.perf_counter(), cpu_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        wall, cpu = self._start
        self.wall += time.perf_counter() - wall
        self.cpu += cpu_seconds() - cpu
        self._start = None


@dataclass
class Curve:
    """One metric of one (arm, seed) run at its evaluation points: ``x`` is the training budget
    spent so far (steps, rollouts, ...), with the CPU and wall seconds spent on training by
    then (a :class:`Clock`'s totals)."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def add(self, x: float, y: float, clock: Clock | None = None) -> None:
        self.x.append(float(x))
        self.y.append(float(y))
        self.cpu.append(round(clock.cpu, 3) if clock else 0.0)
        self.wall.append(round(clock.wall, 3) if clock else 0.0)

    def first_reaching(self, threshold: float, *, by: str = "x") -> float | None:
        """The first ``x`` (or ``cpu``, ``wall``) at which ``y >= threshold``; None if never."""
        at = getattr(self, by)
        return next((a for a, y in zip(at, self.y, strict=True) if y >= threshold), None)

    def area(self) -> float:
        """Mean of ``y`` over the x range (trapezoids): the area under the curve, normalised."""
        if len(self.x) < 2:
            return self.y[0] if self.y else math.nan
        pairs = zip(self.x, self.x[1:], self.y, self.y[1:], strict=False)
        total = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in pairs)
        return total / (self.x[-1] - self.x[0])

    def to_dict(self) -> dict[str, list[float]]:
        return {"x": self.x, "y": self.y, "cpu": self.cpu, "wall": self.wall}


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, population std, count) of the values that are not None; nan when none are."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return math.nan, math.nan, 0
    return statistics.fmean(kept), statistics.pstdev(kept), len(kept)


def fmt_mean_std(values: Sequence[float | None], *, digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over the values that are not None, with ``(k/n)`` when some are None."""
    mean, std, k = mean_std(v * scale if v is not None else None for v in values)
    if k == 0:
        return f"never (0/{len(values)})"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if k == len(values) else f"{text} ({k}/{len(values)})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_results(
    out: Path, data: dict[str, Any], table: str, pngs: Sequence[Path], start: tuple[float, float]
) -> dict[str, Any]:
    """The end of an experiment: add the command's wall and CPU seconds since ``start``
    (``(time.perf_counter(), cpu_seconds())`` when it began) to ``data`` as ``total``, write
    ``results.json`` and ``results.md`` into ``out``, print the table and log what was written."""
    total = {"wall_s": round(time.perf_counter() - start[0], 1),
             "cpu_s": round(cpu_seconds() - start[1], 1)}  # fmt: skip
    data = {**data, "total": total}
    write_json(out / "results.json", data)
    (out / "results.md").write_text(table)
    print(table)
    log(f"total {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU; wrote {out}/results.json,"
        f" results.md, {', '.join(p.name for p in pngs)}")  # fmt: skip
    return data


def plot_curves(
    path: Path,
    curves: dict[str, list[Curve]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: dict[str, float] | None = None,
    by: str = "x",
    ax: Any = None,
) -> None:
    """Each label's seeds as thin lines and their mean (on the first seed's x points) as a thick
    one; ``hlines`` draws dashed reference levels (e.g. the teacher). ``by="cpu"`` (or
    ``"wall"``) puts those seconds on the x axis (seeds are then not averaged: their points do
    not line up). With ``ax`` the plot goes into that axis and nothing is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for run in runs:
            xs = getattr(run, by)
            ax.plot(xs, run.y, color=color, alpha=0.3, linewidth=0.8)
        if by == "x" and runs and all(r.x == runs[0].x for r in runs):
            mean = [statistics.fmean(ys) for ys in zip(*(r.y for r in runs), strict=True)]
            ax.plot(runs[0].x, mean, color=color, linewidth=2.0, label=label)
        else:
            ax.plot([], [], color=color, linewidth=2.0, label=label)
    for j, (label, level) in enumerate((hlines or {}).items()):
        ax.axhline(level, color="black", linestyle=("--", ":", "-.")[j % 3], linewidth=1.0,
                   label=label)  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)


def log(message: str) -> None:
    """One progress line, flushed at once (the experiments run for minutes)."""
    print(message, flush=True)
