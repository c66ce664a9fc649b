"""`kdrl report`: plots, report.md, the terminal table and the CLI on a synthetic run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from kdrl.cli import main
from kdrl.config import dump_config, load_config
from kdrl.report import summary_table, write_report

STEPS = 10
PLOTS = ("reverse_kl", "accuracy", "throughput", "loss")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def train_record(step: int) -> dict:
    return {
        "step": step,
        "rollout/reverse_kl": 2.5 - 0.15 * step,
        "reward/mean": 0.1 * step,
        "reward/accuracy": 0.05 * step,
        "loss/total": 1.0 / (1 + step),
        "loss/kd": 2.0 / (1 + step),
        "loss/grpo": 0.1 - 0.01 * step,
        "perf/response_tokens_per_s": 900.0 + 10 * step,
        "time/rollout": 1.5,
        "time/teacher": 0.4,
        "time/update": 0.8,
        "time/step": 2.8,
        "optim/lr": 1e-5,
    }


def metrics_records() -> list[dict]:
    records = [
        {
            "step": 0,
            "eval/reverse_kl": 2.31,
            "eval/accuracy": 0.25,
            "eval/agreement": 0.125,
            "eval/top1_agreement": 0.6,
            "eval/len_mean": 40.0,
            "eval/teacher_accuracy": 0.75,
        }
    ]
    records += [train_record(step) for step in range(1, STEPS + 1)]
    records[-1] |= {
        "eval/reverse_kl": 0.84,
        "eval/accuracy": 0.625,
        "eval/agreement": 0.5,
        "eval/top1_agreement": 0.8,
        "eval/len_mean": 35.5,
    }
    # A non-finite loss is written as null and listed: the report must skip it, not crash.
    records[3] |= {"loss/total": None, "nonfinite": ["loss/total"]}
    return records


def answers(step: int) -> list[dict]:
    rows = [
        {
            "index": i,
            "prompt": f"What is {i} + {i}?\nThink step by step.",
            "reference": str(2 * i),
            "response": f"step {step} answer {i}" + (" | a pipe" if i == 1 else ""),
            "reward": float(step > 0),
        }
        for i in range(7)
    ]
    # Markdown that would restyle the page, and an answer too long to show whole.
    rows[2]["response"] = f"*bold* <b>x</b> $5 `code`\r\n{step}" + "y" * 1000
    return rows


def make_run(run: Path) -> Path:
    write_jsonl(run / "metrics.jsonl", metrics_records())
    cfg = load_config(
        None,
        [
            "student.path=models/student-0.6b",
            "teacher.path=models/teacher-14b",
            "teacher.kd_estimator=k2",
            "teacher.distill_loss_weight=0.01",
            "train.max_steps=10",
            "train.batch_size=4",
        ],
    )
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    write_jsonl(run / "samples" / "step-00000000.jsonl", answers(0))
    write_jsonl(run / "samples" / "step-00000010.jsonl", answers(10))
    teacher = [{k: v for k, v in row.items() if k != "reference"} for row in answers(99)]
    write_jsonl(run / "samples" / "teacher.jsonl", teacher)
    return run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A complete run directory, no report yet (for tests that change or break an input)."""
    return make_run(tmp_path / "run")


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, str]:
    """A complete run directory and its report.md text, written once: plotting is the slow
    part of these tests."""
    run = make_run(tmp_path_factory.mktemp("reported") / "run")
    report = write_report(run)
    assert report == run / "report.md"
    return run, report.read_text(encoding="utf-8")


def test_plots_are_real_images(reported):
    run, _ = reported
    for name in PLOTS:
        image = imread(run / "report" / f"{name}.png")
        # 7 x 4 inches at 120 dpi, RGBA
        assert image.shape == (480, 840, 4), name
        # Not a blank canvas: axes, lines and text put many pixels far from white.
        gray = image[..., :3].mean(axis=2)
        assert gray.std() > 0.05, name
        assert (gray < 0.5).mean() > 0.005, name


def test_report_table_and_links(reported):
    _, text = reported
    assert "| student before (step 0) | 2.31 | 25.0% | 12.5% | 60.0% | 40.0 |" in text
    assert "| student after (step 10) | 0.84 | 62.5% | 50.0% | 80.0% | 35.5 |" in text
    assert "| teacher | 0 | 75.0% | 100.0% | 100.0% | — |" in text
    assert "fell from 2.31 at step 0 to 0.84 at step 10 (-64%)." in text
    for name in PLOTS:
        assert f"](report/{name}.png)" in text
    # Run section from config.yaml
    assert "- student: `models/student-0.6b`" in text
    assert "- teacher: `models/teacher-14b`" in text
    assert "`k2`, weight 0.01" in text
    assert "- steps: 10" in text
    assert "- batch: 4 prompts × 4 samples" in text
    # Order of sections
    assert text.index("## Run") < text.index("## Before and after") < text.index("## Curves")


def test_sample_answers(reported):
    _, text = reported
    section = text[text.index("## Sample answers") :]
    assert section.count("### Prompt") == 5  # the first five rows, not all seven
    assert "### Prompt 5 (index 4)" in section and "index 5" not in section
    assert "| prompt | What is 1 + 1?<br>Think step by step. |" in section
    assert "| reference answer | 2 |" in section
    assert "| student before (step 0) | step 0 answer 1 \\| a pipe<br>*reward 0* |" in section
    assert "| student after (step 10) | step 10 answer 1 \\| a pipe<br>*reward 1* |" in section
    assert "| teacher | step 99 answer 1 \\| a pipe<br>*reward 1* |" in section
    # Every table row has exactly three unescaped pipes: the answers did not add columns.
    for line in section.splitlines():
        if line.startswith("|") and "---" not in line:
            assert line.replace("\\|", "").count("|") == 3, line


def test_long_and_markdown_answers_are_neutralised(reported):
    _, text = reported
    line = next(x for x in text.splitlines() if x.startswith("| student after (step 10) | \\*"))
    escaped = "\\*bold\\* \\<b\\>x\\</b\\> \\$5 \\`code\\`<br>10yyy"
    assert line.startswith(f"| student after (step 10) | {escaped}")
    assert "y" * 260 in line and "y" * 301 not in line and "y …<br>*reward 1* |" in line


def test_summary_table(reported):
    lines = summary_table(reported[0]).splitlines()
    assert len(lines) == 5  # header, rule, before, after, teacher
    assert lines[0].split() == [
        "reverse",
        "KL",
        "accuracy",
        "agreement",
        "top-1",
        "agr.",
        "answer",
        "len",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[-5:] == ["2.31", "25.0%", "12.5%", "60.0%", "40.0"]
    assert lines[3].split()[-5:] == ["0.84", "62.5%", "50.0%", "80.0%", "35.5"]
    assert lines[4].split() == ["teacher", "0", "75.0%", "100.0%", "100.0%", "—"]
    assert len({len(line) for line in lines}) == 1  # fixed width: every line equally long


def test_only_metrics(tmp_path):
    """No config, no samples, no eval keys, no loss: those sections and plots are left out."""
    records = [{"step": s, "rollout/reverse_kl": 1.0 / s} for s in (1, 2, 3)]
    write_jsonl(tmp_path / "metrics.jsonl", records)
    stale = tmp_path / "report" / "loss.png"  # left by an earlier report: must not survive
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "## Run" not in text and "## Sample answers" not in text and "fell" not in text
    assert "| teacher | 0 | — | 100.0% | 100.0% | — |" in text
    assert "student before" not in text
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["reverse_kl.png"]
    assert "](report/reverse_kl.png)" in text
    assert "report/loss.png" not in text and "report/accuracy.png" not in text


def test_teacher_accuracy_from_teacher_samples(run_dir):
    """Without eval/teacher_accuracy, the teacher's rewards under reward.correct_threshold."""
    records = metrics_records()
    del records[0]["eval/teacher_accuracy"]
    write_jsonl(run_dir / "metrics.jsonl", records)
    rows = answers(99)
    for row in rows[:5]:
        row["reward"] = 0.0
    write_jsonl(run_dir / "samples" / "teacher.jsonl", rows)
    assert summary_table(run_dir).splitlines()[-1].split()[2] == f"{2 / 7:.1%}"


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\.jsonl does not exist"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        summary_table(tmp_path)


def test_bad_inputs_name_the_file(run_dir):
    (run_dir / "config.yaml").write_text("train:\n  batch_size: 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.yaml"):
        write_report(run_dir)
    (run_dir / "config.yaml").unlink()
    (run_dir / "samples" / "teacher.jsonl").write_text("{}\nnot json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"teacher\.jsonl:2"):
        write_report(run_dir)


def test_cli(tmp_path, capsys):
    # Only the eval steps, so that one plot is drawn: the full report is tested above.
    records = [r for r in metrics_records() if "eval/accuracy" in r]
    records = [
        {k: v for k, v in r.items() if k.startswith("eval/") or k == "step"} for r in records
    ]
    write_jsonl(tmp_path / "run" / "metrics.jsonl", records)
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "student after (step 10)" in out and "0.84" in out and "62.5%" in out
    assert out.rstrip().endswith(f"report: {tmp_path / 'run' / 'report.md'}")
    assert (tmp_path / "run" / "report" / "accuracy.png").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_nonfinite_points_leave_a_gap_and_lone_points_a_marker():
    from matplotlib.figure import Figure

    from kdrl.plots import _lines

    records = [
        {"step": 1, "loss/kd": 1.0, "loss/total": 1.0},
        {"step": 2, "loss/kd": None, "loss/total": 0.8, "nonfinite": ["loss/kd"]},
        {"step": 3, "loss/kd": 0.5, "loss/total": 0.6},
        {"step": 4},  # a step that did not log these keys is not a gap
    ]
    ax = Figure().add_subplot()
    assert _lines(ax, records, {"loss/kd": "kd", "loss/total": "total", "loss/grpo": "grpo"})
    kd, total = ax.lines  # loss/grpo is absent: no line
    assert list(kd.get_xdata()) == [1, 2, 3] and math.isnan(kd.get_ydata()[1])
    assert kd.get_marker() == "o"  # steps 1 and 3 have no finite neighbour
    assert list(total.get_ydata()) == [1.0, 0.8, 0.6] and total.get_marker() == "None"
    assert not _lines(Figure().add_subplot(), records[1:2], {"loss/kd": "kd"})
