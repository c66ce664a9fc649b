"""Experiment 1 (experiments/opd_vs_sft.py) in its CI configuration: the adder, one seed, 40
steps per arm, run as a real subprocess.

The papers' ordering (on-policy ahead of supervised training on teacher samples) did not
reproduce in the full runs (docs/results.md, experiment 1), so this asserts what the full runs
showed on every seed of both tasks, with generous margins: the full-distribution arms, on-policy
reverse KL and supervised forward KL, learn faster than the sampled-token `pg` estimator, and
on-policy reverse KL is not ahead of supervised forward KL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiment_quick import run_quick

# Area under the accuracy curve (0-1). Full runs, per seed: the full-distribution arms were
# 0.08-0.23 above `pg` on both tasks, and supervised forward KL 0.02-0.12 above on-policy
# reverse KL; this quick run measured 0.19, 0.22 and 0.02.
MARGIN_PG = 0.05
MARGIN_TIE = 0.03


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("opd_vs_sft")
    return run_quick("opd_vs_sft", out), out


@pytest.mark.slow
def test_full_distribution_arms_beat_pg_and_on_policy_is_not_ahead(quick_run):
    data, _ = quick_run
    auc = {arm: m["auc"][0] for arm, m in data["summary"].items()}
    assert auc["opd_rkl"] > auc["opd_pg"] + MARGIN_PG, auc
    assert auc["sup_fkl"] > auc["opd_pg"] + MARGIN_PG, auc
    assert auc["sup_fkl"] > auc["opd_rkl"] - MARGIN_TIE, auc


@pytest.mark.slow
def test_writes_the_table_the_plots_and_each_arms_config(quick_run):
    data, out = quick_run
    assert set(data["summary"]) == {"opd_rkl", "opd_pg", "sft", "sup_fkl"}
    table = (out / "results.md").read_text()
    assert all(f"| {arm} |" in table for arm in data["summary"])
    for name in ("opd_vs_sft_adder_curves.png", "opd_vs_sft_adder_recovery.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    estimators = {"opd_rkl": "reverse_kl", "opd_pg": "pg", "sup_fkl": "forward_kl"}
    for run in data["runs"]:
        if run["arm"] in estimators:
            assert run["config"]["teacher"]["kd_estimator"] == estimators[run["arm"]]
        assert 0.0 <= run["recovery"]["consistent"] <= 1.0
