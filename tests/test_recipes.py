"""Each shipped recipe's code path, for 2 steps, with tiny local models in place of the hub
models and a few GSM8K-format rows (the recipe's own settings otherwise, bf16 included where
the CPU has it natively)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrl.config import load_config
from kdrl.metrics import read_metrics
from kdrl.models import fast_bf16
from kdrl.train import train

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "examples").glob("gsm8k_*.yaml"))


def test_the_three_recipes_are_shipped():
    assert {p.name for p in RECIPES} == {"gsm8k_kdrl.yaml", "gsm8k_kd.yaml", "gsm8k_grpo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_two_steps_on_tiny_models(recipe, tiny_pair, tmp_path):
    student, teacher = tiny_pair
    data = ROOT / "tests" / "data" / "gsm8k_mini.jsonl"
    base = load_config(recipe)
    overrides = [
        f"student.path={student}", f"data.path={data}", f"eval.path={data}",
        "eval.max_prompts=2", "rollout.max_new_tokens=8", "train.batch_size=2",
        "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false",
    ]  # fmt: skip
    if base.teacher.path:
        overrides.append(f"teacher.path={teacher}")
    if not fast_bf16(torch.device("cpu")):
        # The recipes are GPU recipes in bf16. Where this CPU's torch kernels have no native
        # bf16 they are emulated, and under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU torch's
        # bf16 attention even fails ("pack_vnni2 is only supported when avx512 is supported").
        overrides += ["student.dtype=float32", "teacher.dtype=float32"]
    cfg = load_config(recipe, overrides)
    final = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "reward/mean" in rows[1]
    assert ("loss/kd" in rows[1]) == (cfg.teacher.distill_loss_weight > 0)
    assert ("loss/grpo" in rows[1]) == (cfg.teacher.rl_loss_weight > 0)
    assert (final / "model.safetensors").exists()
