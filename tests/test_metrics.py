"""Metrics sinks: JSONL content, TensorBoard read back, resume truncation, disabled ranks,
and the missing-wandb error."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrl.metrics import MetricsWriter, format_metrics, read_metrics


def writer(out: Path, **kwargs) -> MetricsWriter:
    args = {"tensorboard": False, "wandb": "off", "config": {"seed": 0}} | kwargs
    return MetricsWriter(out, **args)


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_lines_and_nonfinite_values(tmp_path):
    with writer(tmp_path) as w:
        w.write(1, {"loss/total": 0.5, "kd/reverse_kl": 2})
        w.write(
            2, {"loss/total": float("nan"), "kd/reverse_kl": float("-inf"), "time/rollout": 3.0}
        )
        # Flushed per line: a reader sees step 2 before the writer closes.
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss/total": 0.5, "kd/reverse_kl": 2.0}
    assert json.loads(lines[1]) == {
        "step": 2,
        "loss/total": None,
        "kd/reverse_kl": None,
        "time/rollout": 3.0,
        "nonfinite": ["loss/total", "kd/reverse_kl"],
    }
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]  # strict JSON


def test_tensorboard_scalars_read_back(tmp_path):
    with writer(tmp_path, tensorboard=True) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss/total": step / 4, "reward/mean": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path, "loss/total") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [s for s, _ in scalars(tmp_path, "reward/mean")] == [1, 2, 3]


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    with writer(tmp_path, tensorboard=True) as w:
        for step in range(1, 6):
            w.write(step, {"loss/total": float(step)})
    # A crash mid-write leaves a torn last line; resume must survive it.
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss/tot')
    with writer(tmp_path, tensorboard=True, resume_step=3) as w:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for step in (4, 5):
            w.write(step, {"loss/total": 10.0 * step})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss/total"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0]
    # TensorBoard hides the first run's steps 4 and 5 (purge_step) instead of showing both.
    assert scalars(tmp_path, "loss/total") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_fresh_start_replaces_an_old_run(tmp_path):
    with writer(tmp_path, tensorboard=True) as w:
        w.write(1, {"loss/total": 1.0})
        w.write(2, {"loss/total": 1.5})
    with writer(tmp_path, tensorboard=True) as w:
        w.write(1, {"loss/total": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss/total": 2.0}]
    assert scalars(tmp_path, "loss/total") == [(1, 2.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with writer(out, tensorboard=True, enabled=False, resume_step=2) as w:
        w.write(1, {"loss/total": 1.0})
    assert not out.exists()


def test_bad_metrics_are_rejected(tmp_path):
    with writer(tmp_path) as w:
        with pytest.raises(ValueError, match="'loss/total' is not a number"):
            w.write(1, {"loss/total": "high"})
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 1.0})
    with pytest.raises(RuntimeError, match="closed"):
        w.write(2, {"loss/total": 1.0})


def test_read_metrics_names_a_corrupt_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_bad_wandb_mode(tmp_path):
    with pytest.raises(ValueError, match=r"train\.wandb must be one of"):
        writer(tmp_path, wandb="maybe")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("enabled", [True, False])
def test_missing_wandb_is_a_clear_error_on_every_rank(tmp_path, mode, enabled):
    with pytest.raises(ValueError, match=r"pip install kdrl\[wandb\].*train\.wandb=off"):
        writer(tmp_path, wandb=mode, enabled=enabled)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_format_metrics():
    m = {"reward/mean": 0.5, "kd/reverse_kl": 1.234, "optim/lr": 3e-6, "loss/pg": math.nan}
    assert format_metrics(m, {"reward/mean": "reward", "kd/reverse_kl": "rkl"}) == (
        "reward 0.50 rkl 1.23"
    )
    assert format_metrics(m, ["optim/lr", "loss/pg", "absent/key"]) == "lr 3.00e-06 pg nan"
