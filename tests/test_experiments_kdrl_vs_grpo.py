"""Experiment 2 (experiments/kdrl_vs_grpo.py) in its CI configuration: one seed, 40 steps of
16 prompts x 8 samples per arm, run as a real subprocess.

Asserts what the full runs showed on every seed (docs/results.md, experiment 2), with generous
margins on the area under the accuracy curve (0-1): distillation alone and the KDRL joint loss
(beta = 1) learn faster than GRPO alone under the sparse reward; the reference's `seed_k1` term
gives nothing over GRPO (at beta = 0.1 it stays close to GRPO; at beta = 1 its noise made it
worse in the full runs), while the `k2` term at the same weight does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiment_quick import run_quick

# Full runs, per seed: kd and kdrl_b1 were 0.035-0.20 above grpo, seed_k1_b0.1 within 0.04 of
# it, seed_k1_b1 0.09-0.17 below it and 0.19-0.29 below kdrl_b1. This quick run measured
# +0.15, +0.15, 0.004, +0.02 and 0.14.
MARGIN = 0.05
CLOSE = 0.08


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("kdrl_vs_grpo")
    return run_quick("kdrl_vs_grpo", out), out


@pytest.mark.slow
def test_distillation_speeds_up_grpo_and_seed_k1_does_not(quick_run):
    data, _ = quick_run
    auc = {arm: m["auc"][0] for arm, m in data["summary"].items()}
    assert auc["kd"] > auc["grpo"] + MARGIN, auc
    assert auc["kdrl_b1"] > auc["grpo"] + MARGIN, auc
    assert abs(auc["seed_k1_b0.1"] - auc["grpo"]) < CLOSE, auc
    assert auc["seed_k1_b1"] < auc["grpo"] + MARGIN, auc
    assert auc["kdrl_b1"] > auc["seed_k1_b1"] + MARGIN, auc


@pytest.mark.slow
def test_records_groups_rollouts_configs_and_the_plot(quick_run):
    data, out = quick_run
    settings = data["settings"]
    per_step = settings["prompts"] * settings["group"]
    for run in data["runs"]:
        # Equal rollouts per arm, on the x axis of every curve.
        assert run["curve"]["x"][-1] == settings["steps"] * per_step
        shares = run["zero_variance"]["y"]
        assert len(shares) == settings["steps"] and all(0.0 <= z <= 1.0 for z in shares)
        teacher = run["config"]["teacher"]
        assert teacher["rl_loss_weight"] == (0.0 if run["arm"] == "kd" else 1.0)
        if run["arm"].startswith("seed_k1"):
            assert teacher["kd_estimator"] == "seed_k1"
    assert all(f"| {arm} |" in (out / "results.md").read_text() for arm in data["summary"])
    assert (out / "kdrl_vs_grpo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
