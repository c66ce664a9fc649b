"""The synthetic demo: its addition data, its cache, and the end-to-end learning test (on-policy
distillation must make the pruned student add)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from kdrl.config import load_config
from kdrl.demo.synthetic import (
    MARKER,
    SyntheticPaths,
    addition_rows,
    prepare_synthetic,
    synthetic_overrides,
)
from kdrl.metrics import read_metrics
from kdrl.train import train

CONFIG = Path(__file__).parents[1] / "examples" / "synthetic.yaml"
CHEAP = {"n_train": 300, "n_eval": 20, "max_steps": 2}  # a complete set in about a second


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, SyntheticPaths, float]:
    """(folder, paths, seconds taken): the default set, prepared once for the module."""
    out = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    paths = prepare_synthetic(out)
    return out, paths, time.perf_counter() - start


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_stamps(folder: Path) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()}


def test_addition_rows_are_correct_distinct_and_deterministic():
    rows = addition_rows(500, digits=2, seed=3)
    assert rows == addition_rows(500, digits=2, seed=3)
    assert rows != addition_rows(500, digits=2, seed=4)
    assert len({r["prompt"] for r in rows}) == 500
    for row in rows:
        match = re.fullmatch(r"(\d{2})\+(\d{2})=", row["prompt"])
        assert match, row
        assert re.fullmatch(r"\d{3}", row["answer"]), row
        assert int(match[1]) + int(match[2]) == int(row["answer"])
    (wide,) = addition_rows(1, digits=3, seed=0)
    assert re.fullmatch(r"\d{3}\+\d{3}=", wide["prompt"]) and re.fullmatch(r"\d{4}", wide["answer"])
    # Asking for every pair takes the dense path: each of the 100 one-digit sums exactly once.
    every = addition_rows(100, digits=1, seed=0)
    assert sorted(r["prompt"] for r in every) == sorted(
        f"{a}+{b}=" for a in range(10) for b in range(10)
    )
    assert {"prompt": "7+8=", "answer": "15"} in every
    with pytest.raises(ValueError, match="n must be in"):
        addition_rows(101, digits=1, seed=0)


def test_prepared_set_is_disjoint_and_the_teacher_adds(prepared):
    _, paths, seconds = prepared
    train_rows, eval_rows = read_rows(paths.train_file), read_rows(paths.eval_file)
    assert (len(train_rows), len(eval_rows)) == (9800, 200)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    # The point of the demo: a teacher that adds and a pruned student that does not (yet).
    assert paths.teacher_accuracy >= 0.9
    assert paths.student_accuracy <= 0.2
    print(f"prepared in {seconds:.1f} s: teacher {paths.teacher_accuracy:.3f}, "
          f"student {paths.student_accuracy:.3f}")  # fmt: skip


def test_preparation_is_cached(prepared):
    out, paths, seconds = prepared
    before = file_stamps(out)
    start = time.perf_counter()
    again = prepare_synthetic(out)
    assert time.perf_counter() - start < min(1.0, seconds / 5)
    assert again == paths
    assert file_stamps(out) == before


def test_other_settings_or_an_unfinished_folder_are_rebuilt(tmp_path):
    first = prepare_synthetic(tmp_path, seed=0, **CHEAP)
    teacher_file = first.teacher / "model.safetensors"
    old = teacher_file.read_bytes()
    second = prepare_synthetic(tmp_path, seed=1, **CHEAP)
    assert teacher_file.read_bytes() != old
    assert json.loads((tmp_path / MARKER).read_text())["settings"]["seed"] == 1
    assert read_rows(second.eval_file) == addition_rows(20, digits=2, seed=1)
    # Without the marker (written last) a folder counts as unfinished, whatever else it holds.
    (tmp_path / MARKER).unlink()
    stamp = teacher_file.stat().st_mtime_ns
    prepare_synthetic(tmp_path, seed=1, **CHEAP)
    assert (tmp_path / MARKER).is_file() and teacher_file.stat().st_mtime_ns != stamp


def test_overrides_point_the_example_at_the_prepared_set(tmp_path):
    paths = prepare_synthetic(tmp_path / "prep", **CHEAP)
    cfg = load_config(CONFIG, synthetic_overrides(paths, tmp_path / "run"))
    assert Path(cfg.student.path) == paths.student and Path(cfg.teacher.path) == paths.teacher
    assert Path(cfg.data.path) == paths.train_file and Path(cfg.eval.path) == paths.eval_file
    assert Path(cfg.train.output_dir) == tmp_path / "run"
    assert cfg.rollout.max_new_tokens == 4  # "045" and EOS
    assert cfg.teacher.rl_loss_weight == 0 and cfg.reward.fn == "exact_match"
    kept = load_config(CONFIG, synthetic_overrides(paths))
    assert kept.train.output_dir == load_config(CONFIG, []).train.output_dir


@pytest.mark.slow
def test_distillation_teaches_the_pruned_student_to_add(prepared, tmp_path):
    # The whole point of kdrl, end to end: 60 steps of examples/synthetic.yaml (its 100 cut to
    # fit CI). Measured over preparation seeds 0, 1, 2: accuracy 0.08 -> 0.81, 0.08 -> 0.67,
    # 0.07 -> 0.77, and the exact reverse KL fell to 0.12-0.15 of its start.
    _, paths, _ = prepared
    overrides = synthetic_overrides(paths, tmp_path / "run")
    threads = torch.get_num_threads()
    try:
        train(load_config(CONFIG, [*overrides, "train.max_steps=60", "eval.every_steps=0"]))
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide: leave other tests be
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    first, last = evals[0], evals[-1]
    assert (first["step"], last["step"]) == (0, 60)
    # kdrl's own greedy evaluation agrees with the preparation's.
    assert first["eval/accuracy"] == pytest.approx(paths.student_accuracy, abs=0.01)
    for key in ("eval/accuracy", "eval/reverse_kl"):
        print(f"{key}: {first[key]:.3f} -> {last[key]:.3f}")
    assert last["eval/accuracy"] >= first["eval/accuracy"] + 0.3
    assert last["eval/reverse_kl"] <= 0.5 * first["eval/reverse_kl"]
