"""``kdrl report RUN_DIR``: plots and a Markdown report that show what a training run did.

Reads ``metrics.jsonl`` (required; keys in docs/training.md) and, where present, ``config.yaml``,
``samples/teacher.jsonl`` (the teacher's greedy answers to the held-out prompts) and
``samples/step-NNNNNNNN.jsonl`` (the student's answers at each eval step). Writes
``RUN_DIR/report.md`` and its PNGs in ``RUN_DIR/report/``; an absent input or series leaves its
section or plot out.

The report opens with the verdict in plain words (`kdrl.verdict`) and leads with the task metrics
and the teacher-forced NLL of the teacher's answers, which a degenerate student cannot fake; the
reverse KL on the student's own answers, which it can, comes after the answers' health.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdrl.config import Config, ConfigError, load_config
from kdrl.degeneracy import REPEAT_N
from kdrl.metrics import METRICS_FILE, read_metrics
from kdrl.plots import draw_plots, finite, first_finite
from kdrl.run_dir import read_status
from kdrl.verdict import Verdict, run_verdict

REPORT_FILE = "report.md"
PLOTS_DIR = "report"
SAMPLES_DIR = "samples"
TEACHER_SAMPLES = "teacher.jsonl"
N_SAMPLE_PROMPTS = 5
MAX_ANSWER_CHARS = 300
_STEP_FILE = re.compile(r"step-(\d+)\.jsonl")
_MISSING = "—"

# The before/after tables: (metric key, Markdown header, terminal header, number format).
# The headline is the task and what a degenerate student cannot fake; the reverse KL, which it
# can, comes after, with the health of the answers.
Column = tuple[str, str, str, str]
_TASK: tuple[Column, ...] = (
    ("eval/accuracy_greedy", "greedy accuracy", "acc greedy", "{:.1%}"),
    ("eval/accuracy", "sampled accuracy", "acc sampled", "{:.1%}"),
    ("eval/agreement_greedy", "greedy agreement with teacher", "agr greedy", "{:.1%}"),
    ("eval/top1_agreement", "top-1 agreement", "top-1 agr", "{:.1%}"),
    ("eval/teacher_nll", "NLL of teacher's answers (nats/token)", "teacher NLL", "{:.3g}"),
)
_ANSWERS: tuple[Column, ...] = (
    ("eval/len_mean", "mean length (tokens)", "answer len", "{:.1f}"),
    ("eval/eos_frac", "end with EOS", "end EOS", "{:.0%}"),
    ("eval/repeat_frac", f"repeated {REPEAT_N}-grams", f"repeat {REPEAT_N}g", "{:.0%}"),
    ("eval/distinct_frac", "distinct tokens", "distinct", "{:.0%}"),
)
_KL: tuple[Column, ...] = (
    ("eval/reverse_kl", "reverse KL (nats/token)", "rev KL", "{:.3g}"),
    ("eval/reverse_kl_seq", "reverse KL (nats/answer)", "rev KL/ans", "{:.3g}"),
)
_TERMINAL = (*_TASK, _KL[0])  # the terminal's first table; the second is _ANSWERS
# The teacher measured against itself, by definition.
_TEACHER_SELF = {"eval/agreement_greedy": 1.0, "eval/top1_agreement": 1.0,
                 "eval/reverse_kl": 0.0, "eval/reverse_kl_seq": 0.0}  # fmt: skip


@dataclass
class _Run:
    """Everything read from one run directory."""

    records: list[dict]
    config: Config | None
    student_samples: list[tuple[int, list[dict]]]  # (step, rows), by step
    teacher_samples: list[dict] | None
    status: dict | None = None
    """How the run ended (`kdrl.run_dir.write_status`); None for a run still going."""


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` and its plots under ``run_dir/report/``; return the report."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    images = draw_plots(run.records, run_dir, PLOTS_DIR)
    sections = [f"# Run report: {run_dir.resolve().name}"]
    verdict = _verdict(run)
    if verdict is not None:
        sections.append(f"## Verdict\n\n{verdict.text}")
    if run.config is not None:
        sections.append(_run_section(run.config, _steps(run)))
    sections.append("## Before and after training\n\n" + _markdown(run, _task_columns(run)))
    limit = f" within the {run.config.rollout.max_new_tokens}-token limit" if run.config else ""
    sections.append(
        f"### The answers\n\n{_markdown(run, _ANSWERS)}\n\nShares of answers that end with EOS"
        f"{limit}, of their token {REPEAT_N}-grams that repeat one earlier in the same answer, and "
        "of distinct tokens, averaged over answers: a degenerate student stops ending, loops, or "
        "draws on a handful of tokens."
    )
    note = _kl_note(run.records)
    sections.append("### Reverse KL to the teacher\n\n" + _markdown(run, _KL)
                    + (f"\n\n{note}" if note else ""))  # fmt: skip
    if images:
        sections.append("## Curves\n\n" + "\n\n".join(images))
    samples = _samples_section(run)
    if samples:
        sections.append(samples)
    report = run_dir / REPORT_FILE
    report.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return report


def summary_table(run_dir: Path) -> str:
    """The before/after tables as fixed-width plain text and the verdict, for a terminal."""
    run = _load_run(Path(run_dir))
    task = [c for c in _TERMINAL if c in _task_columns(run) or c[0] == "eval/reverse_kl"]
    blocks = [_fixed_width(*_table(run, task, terminal=True)),
              _fixed_width(*_table(run, _ANSWERS, terminal=True))]  # fmt: skip
    verdict = _verdict(run)
    if verdict is not None:
        blocks.append(textwrap.fill(f"Verdict: {verdict.text}", width=100))
    return "\n\n".join(blocks)


def _fixed_width(header: list[str], rows: list[list[str]]) -> str:
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
        status=read_status(run_dir),
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


# --- Tables and text ----------------------------------------------------------------------------


def _task_columns(run: _Run) -> tuple[Column, ...]:
    """`_TASK`, less the sampled accuracy when the run evaluated greedily (it is the greedy one)."""
    if run.config is not None and run.config.eval.temperature == 0:
        return tuple(c for c in _TASK if c[0] != "eval/accuracy")
    return _TASK


def _greedy_fallback(run: _Run, record: dict) -> dict:
    """A run that evaluated greedily before the ``_greedy`` keys existed logged its greedy
    accuracy and agreement as ``eval/accuracy`` and ``eval/agreement``."""
    if run.config is None or run.config.eval.temperature != 0:
        return record
    old = {"eval/accuracy_greedy": "eval/accuracy", "eval/agreement_greedy": "eval/agreement"}
    return {**{new: record[key] for new, key in old.items() if key in record}, **record}


def _table(run: _Run, columns: tuple[Column, ...] | list[Column], *, terminal: bool):
    """Header and rows (student before, after, teacher) of ``columns``; `terminal` picks the
    short headers."""
    keys = [key for cols in (_TASK, _ANSWERS, _KL) for key, *_ in cols]
    evals = [_greedy_fallback(run, r) for r in run.records
             if any(finite(r, k) is not None for k in keys)]  # fmt: skip
    rows: list[tuple[str, dict[str, Any]]] = []
    if evals:
        rows.append((f"student before (step {evals[0]['step']})", evals[0]))
    if len(evals) > 1:
        rows.append((f"student after (step {evals[-1]['step']})", evals[-1]))
    rows.append(("teacher", _teacher_row(run)))
    body = []
    for label, values in rows:
        cells = [(finite(values, key), fmt) for key, _, _, fmt in columns]
        body.append([label, *(_MISSING if v is None else fmt.format(v) for v, fmt in cells)])
    headers = [short if terminal else long for _, long, short, _ in columns]
    return ["", *headers], body


def _teacher_row(run: _Run) -> dict[str, float | None]:
    """The teacher's greedy answers in the columns' keys: its accuracy is greedy accuracy, its
    ``eval/teacher_*`` signals are the answers' columns."""
    row: dict[str, float | None] = {**_TEACHER_SELF, "eval/accuracy_greedy": _teacher_accuracy(run)}
    for key, *_ in _ANSWERS:
        row[key] = first_finite(run.records, key.replace("eval/", "eval/teacher_"))
    return row


def _verdict(run: _Run) -> Verdict | None:
    if run.config is None:
        return run_verdict(run.records)
    records = [_greedy_fallback(run, r) for r in run.records]
    return run_verdict(records, max_new_tokens=run.config.rollout.max_new_tokens,
                       greedy_eval=run.config.eval.temperature == 0)  # fmt: skip


def _markdown(run: _Run, columns: tuple[Column, ...]) -> str:
    return _markdown_table(*_table(run, columns, terminal=False))


def _teacher_accuracy(run: _Run) -> float | None:
    """``eval/teacher_accuracy`` if logged, else the rewards of ``samples/teacher.jsonl`` under
    the run's correctness threshold (which needs config.yaml)."""
    logged = first_finite(run.records, "eval/teacher_accuracy")
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
    """E.g. "... fell from 2.31 at step 0 to 0.84 at step 10 (-64%). ..."; None before 2 evals."""
    points = [(r["step"], v) for r in records if (v := finite(r, "eval/reverse_kl")) is not None]
    if len(points) < 2:
        return None
    (first, before), (last, after) = points[0], points[-1]
    verb = "fell" if after < before else "rose" if after > before else "stayed"
    change = f" ({(after - before) / before:+.0%})" if before > 0 else ""
    return (
        f"Reverse KL to the teacher on the student's own held-out answers {verb} from "
        f"{before:.3g} at step {first} to {after:.3g} at step {last}{change}. It measures how "
        "close the student is where it goes, so it also falls when it goes somewhere degenerate "
        "that the teacher finds likely once there: on its own it shows no learning."
    )


def _steps(run: _Run) -> str:
    """The steps that ran, of how many planned, and how the run ended."""
    status = run.status
    done = max((r["step"] for r in run.records), default=0)
    if status is None:
        return f"{done} (the run has not ended, or predates status.json)"
    text = f"{status['step']} of {status['planned']} planned"
    if status["state"] == "finished":
        return text + ", finished"
    return text + f", {status['state']}: {status['reason']} (kdrl train ... --resume continues)"


def _run_section(cfg: Config, steps: str) -> str:
    weight = f"{cfg.teacher.distill_loss_weight:g}"
    if cfg.teacher.distill_loss_weight_final is not None:
        weight += f" → {cfg.teacher.distill_loss_weight_final:g}"
    items = {
        "student": f"`{cfg.student.path}`",
        "teacher": f"`{cfg.teacher.path}`" if cfg.teacher.path else "none (GRPO only)",
        "distillation loss": f"`{cfg.teacher.kd_estimator}`, weight {weight}",
        "GRPO loss weight": f"{cfg.teacher.rl_loss_weight:g} (reward `{cfg.reward.fn}`)",
        "steps": steps,
        "batch": f"{cfg.train.batch_size} prompts × {cfg.rollout.n_samples} samples",
        "learning rate": f"{cfg.optim.lr:g}",
    }
    if cfg.eval.path:
        t = cfg.eval.temperature
        greedy = " and greedy" if cfg.eval.greedy and t > 0 else ""
        items["evaluation"] = f"`{cfg.eval.path}`, answers at temperature {t:g}{greedy}"
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
