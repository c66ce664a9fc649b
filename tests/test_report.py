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
PLOTS = ("accuracy", "answers", "reverse_kl", "throughput", "loss")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def train_record(step: int) -> dict:
    return {
        "step": step,
        "rollout/reverse_kl": 2.5 - 0.15 * step,
        "rollout/eos_frac": 0.5 + 0.04 * step,
        "rollout/repeat_frac": 0.1 - 0.005 * step,
        "rollout/distinct_frac": 0.8,
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
            "eval/reverse_kl_seq": 92.4,
            "eval/accuracy": 0.25,
            "eval/accuracy_greedy": 0.375,
            "eval/agreement": 0.125,
            "eval/agreement_greedy": 0.25,
            "eval/top1_agreement": 0.6,
            "eval/teacher_nll": 3.2,
            "eval/len_mean": 40.0,
            "eval/eos_frac": 0.5,
            "eval/repeat_frac": 0.05,
            "eval/distinct_frac": 0.8,
            "eval/teacher_accuracy": 0.75,
            "eval/teacher_len_mean": 30.0,
            "eval/teacher_eos_frac": 0.9,
            "eval/teacher_repeat_frac": 0.02,
            "eval/teacher_distinct_frac": 0.85,
        }
    ]
    records += [train_record(step) for step in range(1, STEPS + 1)]
    records[-1] |= {
        "eval/reverse_kl": 0.84,
        "eval/reverse_kl_seq": 29.8,
        "eval/accuracy": 0.625,
        "eval/accuracy_greedy": 0.75,
        "eval/agreement": 0.5,
        "eval/agreement_greedy": 0.625,
        "eval/top1_agreement": 0.8,
        "eval/teacher_nll": 1.9,
        "eval/len_mean": 35.5,
        "eval/eos_frac": 0.875,
        "eval/repeat_frac": 0.02,
        "eval/distinct_frac": 0.84,
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
            "eval.path=held_out.jsonl",
            "eval.temperature=1.0",
            "rollout.max_new_tokens=48",
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


def test_report_verdict_tables_and_links(reported):
    _, text = reported
    assert (
        "## Verdict\n\nThe student learnt: greedy accuracy rose from 38% to 75%; sampled accuracy "
        "rose from 25% to 62%; greedy agreement rose from 25% to 62%; sampled agreement rose from "
        "12% to 50%; teacher-forced NLL fell from 3.2 to 1.9 nats/token.\n"
    ) in text
    # The headline: the task and the teacher-forced NLL.
    assert (
        "|  | greedy accuracy | sampled accuracy | greedy agreement with teacher | top-1 agreement "
        "| NLL of teacher's answers (nats/token) |"
    ) in text
    assert "| student before (step 0) | 37.5% | 25.0% | 25.0% | 60.0% | 3.2 |" in text
    assert "| student after (step 10) | 75.0% | 62.5% | 62.5% | 80.0% | 1.9 |" in text
    assert "| teacher | 75.0% | — | 100.0% | 100.0% | — |" in text
    # The answers, the student's beside the teacher's.
    assert "| student before (step 0) | 40.0 | 50% | 5% | 80% |" in text
    assert "| student after (step 10) | 35.5 | 88% | 2% | 84% |" in text
    assert "| teacher | 30.0 | 90% | 2% | 85% |" in text
    assert "end with EOS within the 48-token limit" in text
    # The reverse KL, per token and per answer, with what it does not show.
    assert "| student before (step 0) | 2.31 | 92.4 |" in text
    assert "| student after (step 10) | 0.84 | 29.8 |" in text
    assert "| teacher | 0 | 0 |" in text
    assert "fell from 2.31 at step 0 to 0.84 at step 10 (-64%)." in text
    assert "on its own it shows no learning" in text
    for name in PLOTS:
        assert f"](report/{name}.png)" in text
    # Run section from config.yaml
    assert "- student: `models/student-0.6b`" in text
    assert "- teacher: `models/teacher-14b`" in text
    assert "`k2`, weight 0.01" in text
    assert "- steps: 10" in text
    assert "- batch: 4 prompts × 4 samples" in text
    assert "- evaluation: `held_out.jsonl`, answers at temperature 1 and greedy" in text
    # Order of sections: the verdict first, the reverse KL after the task and the answers.
    order = ["## Verdict", "## Run", "## Before and after", "### The answers",
             "### Reverse KL", "## Curves", "## Sample answers"]  # fmt: skip
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)


def degenerate_records() -> list[dict]:
    """make demo's ending: the reverse KL falls 92%, nothing else improves, and the answers
    become strings of digits that never end."""
    before = {"eval/reverse_kl": 9.57, "eval/accuracy": 0.0, "eval/accuracy_greedy": 0.0,
              "eval/agreement": 0.0, "eval/agreement_greedy": 0.0, "eval/top1_agreement": 0.0,
              "eval/teacher_nll": 9.1, "eval/eos_frac": 0.0, "eval/repeat_frac": 0.2,
              "eval/distinct_frac": 0.7}  # fmt: skip
    teacher = {"eval/teacher_eos_frac": 0.97, "eval/teacher_repeat_frac": 0.0,
               "eval/teacher_distinct_frac": 0.94, "eval/teacher_accuracy": 0.467}  # fmt: skip
    after = {**before, "eval/reverse_kl": 0.804, "eval/top1_agreement": 0.021,
             "eval/teacher_nll": 9.3, "eval/repeat_frac": 0.61,
             "eval/distinct_frac": 0.3}  # fmt: skip
    return [{"step": 0, **before, **teacher}, {"step": 20, **after}]


def test_a_degenerate_run_is_never_reported_as_an_improvement(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", degenerate_records())
    cfg = load_config(None, ["rollout.max_new_tokens=32", "eval.temperature=1.0"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    verdict = (
        "The student did not learn: reverse KL fell 92% but accuracy, agreement and "
        "teacher-forced NLL did not improve (greedy accuracy 0% -> 0%, sampled accuracy 0% -> "
        "0%, greedy agreement 0% -> 0%, sampled agreement 0% -> 0%, teacher-forced NLL 9.1 -> "
        "9.3 nats/token); its answers are degenerate (0% end within the 32-token limit against "
        "97% of the teacher's; 61% repeated 3-grams against 0% of the teacher's; only 30% "
        "distinct tokens per answer against 94% of the teacher's)."
    )
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert f"## Verdict\n\n{verdict}\n" in text
    summary = summary_table(tmp_path)
    assert " ".join(summary[summary.index("Verdict:") :].split()) == f"Verdict: {verdict}"
    assert all(len(line) <= 100 for line in summary[summary.index("Verdict:") :].splitlines())


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
    task, answers, verdict = summary_table(reported[0]).split("\n\n")
    lines = task.splitlines()
    assert len(lines) == 5  # header, rule, before, after, teacher
    assert lines[0].split() == ["acc", "greedy", "acc", "sampled", "agr", "greedy", "top-1", "agr",
                                "teacher", "NLL", "rev", "KL"]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[-6:] == ["37.5%", "25.0%", "25.0%", "60.0%", "3.2", "2.31"]
    assert lines[3].split()[-6:] == ["75.0%", "62.5%", "62.5%", "80.0%", "1.9", "0.84"]
    assert lines[4].split() == ["teacher", "75.0%", "—", "100.0%", "100.0%", "—", "0"]
    assert len({len(line) for line in lines}) == 1  # fixed width: every line equally long
    lines = answers.splitlines()
    assert lines[0].split() == ["answer", "len", "end", "EOS", "repeat", "3g", "distinct"]
    assert lines[3].split()[-4:] == ["35.5", "88%", "2%", "84%"]
    assert lines[4].split() == ["teacher", "30.0", "90%", "2%", "85%"]
    assert verdict.startswith("Verdict: The student learnt: greedy accuracy rose from 38% to 75%;")


def test_a_greedy_evaluation_has_one_accuracy_column(run_dir):
    """eval.temperature 0: the answers are greedy, so a sampled accuracy column would repeat the
    greedy one; a run logged before the _greedy keys existed still fills the greedy columns."""
    cfg = load_config(run_dir / "config.yaml", ["eval.temperature=0"])
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    old = [{k: v for k, v in r.items() if not k.endswith("_greedy")} for r in metrics_records()]
    write_jsonl(run_dir / "metrics.jsonl", old)
    task = summary_table(run_dir).split("\n\n")[0].splitlines()
    assert "acc sampled" not in task[0]
    assert task[3].split()[-5:] == ["62.5%", "50.0%", "80.0%", "1.9", "0.84"]
    assert "sampled" not in summary_table(run_dir).split("Verdict:")[1]


def test_only_metrics(tmp_path):
    """No config, no samples, no eval keys, no loss: those sections and plots are left out."""
    records = [{"step": s, "rollout/reverse_kl": 1.0 / s} for s in (1, 2, 3)]
    write_jsonl(tmp_path / "metrics.jsonl", records)
    stale = tmp_path / "report" / "loss.png"  # left by an earlier report: must not survive
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "## Run" not in text and "## Sample answers" not in text and "fell" not in text
    assert "## Verdict" not in text  # nothing evaluated, nothing to judge
    assert "| teacher | — | — | 100.0% | 100.0% | — |" in text
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
    teacher = summary_table(run_dir).splitlines()[4]
    assert teacher.split()[:2] == ["teacher", f"{2 / 7:.1%}"]


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
