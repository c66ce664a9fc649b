"""``kdrl report RUN_DIR``: plots and a Markdown report that show what a training run did.

Reads ``metrics.jsonl`` (required; keys in docs/training.md) and, where present, ``config.yaml``,
``samples/teacher.jsonl`` (the teacher's greedy answers to the held-out prompts) and
``samples/step-NNNNNNNN.jsonl`` (the student's answers at each eval step). Writes
``RUN_DIR/report.md`` and its PNGs in ``RUN_DIR/report/``; an absent input or series leaves its
section or plot out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdrl.config import Config, ConfigError, load_config
from kdrl.metrics import METRICS_FILE, read_metrics

REPORT_FILE = "report.md"
PLOTS_DIR = "report"
SAMPLES_DIR = "samples"
TEACHER_SAMPLES = "teacher.jsonl"
N_SAMPLE_PROMPTS = 5
MAX_ANSWER_CHARS = 300
_STEP_FILE = re.compile(r"step-(\d+)\.jsonl")
_MISSING = "—"
_DPI = 120
_FIGSIZE = (7.0, 4.0)
_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5}

# The before/after table: (metric key, Markdown header, terminal header, number format).
_COLUMNS = (
    ("eval/reverse_kl", "reverse KL to teacher", "reverse KL", "{:.3g}"),
    ("eval/accuracy", "accuracy", "accuracy", "{:.1%}"),
    ("eval/agreement", "agreement with teacher's answers", "agreement", "{:.1%}"),
    ("eval/top1_agreement", "top-1 agreement", "top-1 agr.", "{:.1%}"),
    ("eval/len_mean", "mean answer length (tokens)", "answer len", "{:.1f}"),
)
# The teacher measured against itself, by definition.
_TEACHER_SELF = {"eval/reverse_kl": 0.0, "eval/agreement": 1.0, "eval/top1_agreement": 1.0}


@dataclass
class _Run:
    """Everything read from one run directory."""

    records: list[dict]
    config: Config | None
    student_samples: list[tuple[int, list[dict]]]  # (step, rows), by step
    teacher_samples: list[dict] | None


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` and its plots under ``run_dir/report/``; return the report."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    images = []
    for name, (alt, plot) in _PLOTS.items():
        path = plots_dir / f"{name}.png"
        if _draw(plot, run.records, path):
            images.append(f"![{alt}]({PLOTS_DIR}/{name}.png)")
        else:  # a stale plot from an earlier report would contradict this one
            path.unlink(missing_ok=True)
    sections = [f"# Run report: {run_dir.resolve().name}"]
    if run.config is not None:
        sections.append(_run_section(run.config))
    header, rows = _table(run, terminal=False)
    table = "## Before and after training\n\n" + _markdown_table(header, rows)
    note = _kl_note(run.records)
    sections.append(table + (f"\n\n{note}" if note else ""))
    if images:
        sections.append("## Curves\n\n" + "\n\n".join(images))
    samples = _samples_section(run)
    if samples:
        sections.append(samples)
    report = run_dir / REPORT_FILE
    report.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return report


def summary_table(run_dir: Path) -> str:
    """The before/after table as fixed-width plain text, for a terminal."""
    header, rows = _table(_load_run(Path(run_dir)), terminal=True)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    # Labels left-aligned, numbers right-aligned.
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, len(row))])
        for row in lines
    )


# --- Reading the run directory ------------------------------------------------------------------


def _load_run(run_dir: Path) -> _Run:
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"{metrics} does not exist: is {run_dir} a kdrl run directory?")
    config_path = run_dir / "config.yaml"
    samples = run_dir / SAMPLES_DIR
    student = [
        (int(m.group(1)), _read_jsonl(p))
        for p in sorted(samples.glob("step-*.jsonl"))
        if (m := _STEP_FILE.fullmatch(p.name))
    ]
    teacher = samples / TEACHER_SAMPLES
    return _Run(
        records=read_metrics(metrics),
        config=_load_config(config_path) if config_path.exists() else None,
        student_samples=sorted(student, key=lambda item: item[0]),
        teacher_samples=_read_jsonl(teacher) if teacher.is_file() else None,
    )


def _load_config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        # Range errors from validation name the key but not the file; say which file it was.
        if str(path) in str(err):
            raise
        raise ConfigError(f"{path}: {err}") from err


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def _value(record: dict, key: str) -> float | None:
    """The finite value of `key` in `record`, else None (absent, or written as null)."""
    value = record.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; a non-finite value (null) becomes NaN, which matplotlib draws
    as a gap, so a curve does not hide the steps that went wrong."""
    points = [(r["step"], _value(r, key)) for r in records if key in r]
    if all(v is None for _, v in points):
        return [], []
    return [s for s, _ in points], [math.nan if v is None else v for _, v in points]


def _first(records: list[dict], key: str) -> float | None:
    return next((v for r in records if (v := _value(r, key)) is not None), None)


# --- Tables and text ----------------------------------------------------------------------------


def _table(run: _Run, *, terminal: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows (student before, after, teacher); `terminal` picks the short headers."""
    keys = [key for key, *_ in _COLUMNS]
    evals = [r for r in run.records if any(_value(r, k) is not None for k in keys)]
    rows: list[tuple[str, dict[str, Any]]] = []
    if evals:
        rows.append((f"student before (step {evals[0]['step']})", evals[0]))
    if len(evals) > 1:
        rows.append((f"student after (step {evals[-1]['step']})", evals[-1]))
    accuracy, length = _teacher_accuracy(run), _first(run.records, "eval/teacher_len_mean")
    rows.append(("teacher", _TEACHER_SELF | {"eval/accuracy": accuracy, "eval/len_mean": length}))
    body = []
    for label, values in rows:
        cells = [(_value(values, key), fmt) for key, _, _, fmt in _COLUMNS]
        body.append([label, *(_MISSING if v is None else fmt.format(v) for v, fmt in cells)])
    headers = [short if terminal else long for _, long, short, _ in _COLUMNS]
    return ["", *headers], body


def _teacher_accuracy(run: _Run) -> float | None:
    """``eval/teacher_accuracy`` if logged, else the rewards of ``samples/teacher.jsonl`` under
    the run's correctness threshold (which needs config.yaml)."""
    logged = _first(run.records, "eval/teacher_accuracy")
    if logged is not None or not run.teacher_samples or run.config is None:
        return logged
    rewards = [row.get("reward") for row in run.teacher_samples]
    if any(not isinstance(r, int | float) for r in rewards):
        return None  # no reward function: accuracy is unknown, not zero
    threshold = run.config.reward.correct_threshold
    return sum(r >= threshold for r in rewards) / len(rewards)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _kl_note(records: list[dict]) -> str | None:
    """E.g. "... fell from 2.31 at step 0 to 0.84 at step 10 (-64%)."; None before 2 evals."""
    points = [(r["step"], v) for r in records if (v := _value(r, "eval/reverse_kl")) is not None]
    if len(points) < 2:
        return None
    (first, before), (last, after) = points[0], points[-1]
    verb = "fell" if after < before else "rose" if after > before else "stayed"
    change = f" ({(after - before) / before:+.0%})" if before > 0 else ""
    return (
        f"Reverse KL to the teacher on the held-out prompts {verb} from {before:.3g} at step "
        f"{first} to {after:.3g} at step {last}{change}."
    )


def _run_section(cfg: Config) -> str:
    weight = f"{cfg.teacher.distill_loss_weight:g}"
    if cfg.teacher.distill_loss_weight_final is not None:
        weight += f" → {cfg.teacher.distill_loss_weight_final:g}"
    steps = cfg.train.max_steps or f"{cfg.train.epochs} epoch(s)"
    items = {
        "student": f"`{cfg.student.path}`",
        "teacher": f"`{cfg.teacher.path}`" if cfg.teacher.path else "none (GRPO only)",
        "distillation loss": f"`{cfg.teacher.kd_estimator}`, weight {weight}",
        "GRPO loss weight": f"{cfg.teacher.rl_loss_weight:g} (reward `{cfg.reward.fn}`)",
        "steps": str(steps),
        "batch": f"{cfg.train.batch_size} prompts × {cfg.rollout.n_samples} samples",
        "learning rate": f"{cfg.optim.lr:g}",
    }
    return "## Run\n\n" + "\n".join(f"- {name}: {value}" for name, value in items.items())


def _samples_section(run: _Run) -> str | None:
    """Up to `N_SAMPLE_PROMPTS` prompts, each a two-column table of the answers side by side."""
    columns: list[tuple[str, dict[Any, dict]]] = []
    if run.student_samples:
        (first, before), (last, after) = run.student_samples[0], run.student_samples[-1]
        label = "student before" if last != first else "student"
        columns.append((f"{label} (step {first})", {r.get("index"): r for r in before}))
        if last != first:
            columns.append((f"student after (step {last})", {r.get("index"): r for r in after}))
    if run.teacher_samples:
        columns.append(("teacher", {r.get("index"): r for r in run.teacher_samples}))
    if not columns:
        return None
    lead = run.student_samples[0][1] if run.student_samples else run.teacher_samples or []
    blocks = ["## Sample answers"]
    for n, row in enumerate(lead[:N_SAMPLE_PROMPTS], start=1):
        lines = ["| | |", "|---|---|", f"| prompt | {_cell(row.get('prompt'))} |"]
        if row.get("reference") is not None:
            lines.append(f"| reference answer | {_cell(row['reference'])} |")
        for label, by_index in columns:
            answer = by_index.get(row.get("index"))
            lines.append(f"| {label} | {_answer_cell(answer)} |")
        blocks.append(f"### Prompt {n} (index {row.get('index')})\n\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def _answer_cell(row: dict | None) -> str:
    if row is None:
        return "*(no answer)*"
    text = _cell(row.get("response"))
    reward = row.get("reward")
    return text + (f"<br>*reward {reward:g}*" if isinstance(reward, int | float) else "")


def _cell(text: Any) -> str:
    """`text` cut to `MAX_ANSWER_CHARS` and made safe inside one Markdown table cell: pipes,
    newlines and emphasis/HTML/math characters would otherwise break the table or restyle it."""
    if text is None or str(text).strip() == "":
        return "*(empty)*"
    text = str(text).strip()
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS].rstrip() + " …"
    text = re.sub(r"([\\`*_\[\]<>|~&$#])", r"\\\1", text)
    return re.sub(r"\r\n|\r|\n", "<br>", text)


# --- Plots --------------------------------------------------------------------------------------


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
        steps, values = _series(records, key)
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
    held_out = {"eval/reverse_kl": "held-out, exact per token"}
    rollout = {"rollout/reverse_kl": "training samples, one-token estimate"}
    ax.set(title="Reverse KL to the teacher", xlabel="training step")
    ax.set_ylabel("reverse KL to teacher (nats / token)")
    drawn = _lines(ax, records, rollout, linewidth=1.0, alpha=0.7, color="tab:gray")
    return _lines(ax, records, held_out, marker="o", linewidth=2.0, color="tab:blue") or drawn


def _plot_accuracy(fig: Any, records: list[dict]) -> bool:
    ax = fig.add_subplot()
    training = {"reward/accuracy": "training samples' accuracy"}
    drawn = _lines(ax, records, training, linewidth=1.0, alpha=0.6)
    keys = {
        "eval/accuracy": "held-out accuracy",
        "eval/agreement": "agreement with teacher's answers",
        "eval/top1_agreement": "top-1 agreement with teacher",
    }
    drawn |= _lines(ax, records, keys, marker="o", linewidth=1.8)
    teacher = _first(records, "eval/teacher_accuracy")
    if drawn and teacher is not None:
        ax.axhline(teacher, linestyle="--", color="black", linewidth=1.2, label="teacher accuracy")
    ax.set(title="Accuracy and agreement", xlabel="training step", ylabel="fraction")
    ax.set_ylim(-0.02, 1.02)  # the margin keeps points at exactly 0 or 1 visible
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
_PLOTS: dict[str, tuple[str, Callable[[Any, list[dict]], bool]]] = {
    "reverse_kl": ("Reverse KL to the teacher", _plot_reverse_kl),
    "accuracy": ("Accuracy and agreement", _plot_accuracy),
    "throughput": ("Throughput and time per phase", _plot_throughput),
    "loss": ("Training loss", _plot_loss),
}
