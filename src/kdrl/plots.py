"""The plots of ``kdrl report``: PNGs of a run's metrics, one figure per topic.

Each plot function draws the series it finds in the ``metrics.jsonl`` records onto a figure and
returns whether there was anything to draw; `draw_plots` saves those that had data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DPI = 120
_FIGSIZE = (7.0, 4.0)
_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5}


def draw_plots(records: list[dict], run_dir: Path, plots_dir: str) -> list[str]:
    """Draw every plot that has data into ``run_dir / plots_dir``; returns their Markdown image
    links, in the report's order."""
    folder = run_dir / plots_dir
    folder.mkdir(exist_ok=True)
    images = []
    for name, (alt, plot) in PLOTS.items():
        path = folder / f"{name}.png"
        if _draw(plot, records, path):
            images.append(f"![{alt}]({plots_dir}/{name}.png)")
        else:  # a stale plot from an earlier report would contradict this one
            path.unlink(missing_ok=True)
    return images


def finite(record: dict, key: str) -> float | None:
    """The finite value of `key` in `record`, else None (absent, or written as null)."""
    v = record.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; a non-finite value (null) becomes NaN, which matplotlib draws
    as a gap, so a curve does not hide the steps that went wrong."""
    points = [(r["step"], finite(r, key)) for r in records if key in r]
    if all(v is None for _, v in points):
        return [], []
    return [s for s, _ in points], [math.nan if v is None else v for _, v in points]


def first_finite(records: list[dict], key: str) -> float | None:
    """The first finite value of `key` in `records`, else None."""
    return next((v for r in records if (v := finite(r, key)) is not None), None)


def _draw(plot: Callable[[Any, list[dict]], bool], records: list[dict], path: Path) -> bool:
    """Run `plot` on a fresh figure and save it to `path`; False (nothing saved) when it had no
    data. A bare `Figure` renders with Agg without pyplot, so the caller's backend is untouched
    and no figure is left open."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
        if not plot(fig, records):
            return False
        for ax in fig.axes:
            ax.grid(True, alpha=0.3)
            _integer_steps(ax)
        # One legend under the plot for every panel: inside the axes it hides curves.
        n_labels = sum(len(ax.get_legend_handles_labels()[1]) for ax in fig.axes)
        if n_labels:
            ncol = n_labels if n_labels <= 4 else 3  # long labels: at most three side by side
            fig.legend(loc="outside lower center", ncol=ncol, frameon=False)
        fig.savefig(path, dpi=_DPI)
    return True


def _integer_steps(ax: Any) -> None:
    """Whole-number step ticks; an axis narrower than two steps (one point) is widened, since
    the integer locator otherwise falls back to ticks such as -0.04."""
    lo, hi = ax.get_xlim()
    if hi - lo < 2:
        mid = (lo + hi) / 2
        ax.set_xlim(max(mid - 1, -0.25), mid + 1)
    ax.xaxis.get_major_locator().set_params(integer=True)


def _lines(ax: Any, records: list[dict], keys: dict[str, str], **style: Any) -> bool:
    """Plot each present key of `keys` (key -> label) against step; True if any was present."""
    drawn = False
    for key, label in keys.items():
        steps, values = series(records, key)
        if steps:
            # A point with no finite neighbour draws no line segment: a marker keeps it visible.
            ok = [False, *(not math.isnan(v) for v in values), False]
            lone = any(ok[i] and not ok[i - 1] and not ok[i + 1] for i in range(1, len(ok) - 1))
            marker = style.get("marker") or ("o" if lone else None)
            ax.plot(steps, values, label=label, **{**style, "marker": marker})
            drawn = True
    return drawn


def _plot_reverse_kl(fig: Any, records: list[dict]) -> bool:
    ax = fig.add_subplot()
    held_out = {"eval/reverse_kl": "reverse KL, held-out (exact)"}
    rollout = {"rollout/reverse_kl": "reverse KL, training (one-token estimate)"}
    nll = {"eval/teacher_nll": "NLL of teacher's answers"}
    ax.set(title="Reverse KL to the teacher, and NLL of its answers", xlabel="training step")
    ax.set_ylabel("nats / token")
    drawn = _lines(ax, records, rollout, linewidth=1.0, alpha=0.7, color="tab:gray")
    drawn |= _lines(ax, records, held_out, marker="o", linewidth=2.0, color="tab:blue")
    return _lines(ax, records, nll, marker="s", linewidth=2.0, color="tab:red") or drawn


def _plot_accuracy(fig: Any, records: list[dict]) -> bool:
    ax = fig.add_subplot()
    training = {"reward/accuracy": "training samples' accuracy"}
    drawn = _lines(ax, records, training, linewidth=1.0, alpha=0.6)
    # Held-out; "eval temp." is eval.temperature, agreement is with the teacher's answers.
    keys = {
        "eval/accuracy_greedy": "greedy accuracy",
        "eval/accuracy": "accuracy (eval temp.)",
        "eval/agreement_greedy": "greedy agreement",
        "eval/agreement": "agreement (eval temp.)",
        "eval/top1_agreement": "top-1 agreement",
    }
    drawn |= _lines(ax, records, keys, marker="o", linewidth=1.8)
    teacher = first_finite(records, "eval/teacher_accuracy")
    if drawn and teacher is not None:
        ax.axhline(teacher, linestyle="--", color="black", linewidth=1.2, label="teacher accuracy")
    ax.set(title="Accuracy and agreement with the teacher", xlabel="training step",
           ylabel="fraction")  # fmt: skip
    ax.set_ylim(-0.02, 1.02)  # the margin keeps points at exactly 0 or 1 visible
    return drawn


def _plot_answers(fig: Any, records: list[dict]) -> bool:
    """The degeneracy signals: training samples as thin lines, held-out answers as markers, the
    teacher's held-out answers as dashed levels, one colour per signal."""
    ax = fig.add_subplot()
    drawn = False
    signals = {"eos_frac": "end with EOS", "repeat_frac": "repeated 3-grams",
               "distinct_frac": "distinct tokens"}  # fmt: skip
    for (name, label), color in zip(signals.items(), ("tab:green", "tab:red", "tab:blue"),
                                    strict=True):  # fmt: skip
        drawn |= _lines(ax, records, {f"rollout/{name}": f"{label}, training"},
                        linewidth=1.0, alpha=0.6, color=color)  # fmt: skip
        drawn |= _lines(ax, records, {f"eval/{name}": f"{label}, held-out"},
                        marker="o", linewidth=1.8, color=color)  # fmt: skip
        teacher = first_finite(records, f"eval/teacher_{name}")
        if teacher is not None:
            ax.axhline(teacher, linestyle="--", color=color, linewidth=1.0,
                       label=f"{label}, teacher")  # fmt: skip
    ax.set(title="Health of the answers", xlabel="training step", ylabel="share")
    ax.set_ylim(-0.02, 1.02)
    return drawn


def _plot_throughput(fig: Any, records: list[dict]) -> bool:
    speed, times = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    # The y label names the throughput curve; "_" keeps it out of the legend of the phases.
    speed_key = {"perf/response_tokens_per_s": "_sampled tokens / s"}
    sampled = _lines(speed, records, speed_key, color="tab:purple")
    timed = _lines(times, records, {"time/step": "whole step"}, color="black", linestyle="--")
    phases = {
        "time/rollout": "sampling",
        "time/teacher": "teacher scoring",
        "time/update": "update",
    }
    timed |= _lines(times, records, phases, linewidth=1.5)
    speed.set(title="Throughput", xlabel="training step", ylabel="sampled tokens / s of step")
    times.set(title="Time per phase", xlabel="training step", ylabel="seconds per step")
    for ax, present in ((speed, sampled), (times, timed)):
        if present:  # from zero, so that a 5% dip does not look like a collapse
            ax.set_ylim(0, ax.dataLim.y1 * 1.08)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return sampled or timed


def _plot_loss(fig: Any, records: list[dict]) -> bool:
    ax = fig.add_subplot()
    ax.set(title="Training loss", xlabel="training step", ylabel="loss (terms before weighting)")
    keys = {"loss/total": "total", "loss/kd": "distillation term", "loss/grpo": "GRPO term"}
    return _lines(ax, records, keys, linewidth=1.5)


# file name -> (alt text, plot function); the report embeds them in this order.
PLOTS: dict[str, tuple[str, Callable[[Any, list[dict]], bool]]] = {
    "accuracy": ("Accuracy and agreement", _plot_accuracy),
    "answers": ("Health of the answers", _plot_answers),
    "reverse_kl": ("Reverse KL to the teacher, and NLL of its answers", _plot_reverse_kl),
    "throughput": ("Throughput and time per phase", _plot_throughput),
    "loss": ("Training loss", _plot_loss),
}
