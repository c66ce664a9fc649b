"""Experiment 3: reverse KL seeks one mode, forward KL covers them all (MiniLLM / GKD / TML).

    python experiments/divergences.py [--seeds 3] [--out runs/exp-divergences] [--quick]

The effect exists only when the student *cannot* represent the teacher, so every part here
pairs a multi-modal teacher whose distribution is known exactly with a student that cannot copy
it. Three parts (experiment 3 in docs/results.md has the measured tables and plots):

* ``3a`` one answer token over 64 ordered ids. Teacher: per prompt, two discretised Gaussians
  (sd 2) 30-36 ids apart. Student: a unimodal Gaussian head (``logit_v = -(v - mu)^2 / 2 s^2``,
  ``mu`` and ``s`` from an MLP on a prompt embedding). Signals: forward KL (exact, and SFT on
  teacher samples), generalized JSD, reverse KL (exact, and kdrl's sampled ``pg`` estimator).
* ``3b-fact`` a 6-token answer from a mixture of K=8 strings per prompt (per-token noise
  eps=0.01, exact prefix-conditional log-probs through the posterior over strings). Student:
  factorised (each position independent of the prefix). Signals as in 3a plus ``pg`` with
  ``kd_discount`` 0 (per-token reverse KL, as TML) to 1 (sequence-level, as MiniLLM).
* ``3b-ar`` the same teacher over a real tokenizer, the student a tiny autoregressive Hugging
  Face Llama (kdrl.tiny, hidden 16), warm-started by SFT, then trained by kdrl's own loop
  (`kdrl.train.build` and `train_step`) with the programmatic teacher in place of the loaded one.

Every distillation arm's loss is `kdrl.loss.kdrl_loss` (``rl_loss_weight=0``), which calls
`kdrl.kd` / `kdrl.divergences`; SFT on teacher samples, which kdrl does not train, is here.
Writes ``results.json``, ``results.md`` and PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, markdown_table
from divergences_bimodal import ARMS_3A, Arm, Bimodal, run_bimodal
from divergences_plots import plot_all
from divergences_strings import (
    ARMS_AR,
    ARMS_FACT,
    Autoregressive,
    Strings,
    prepare_autoregressive,
    run_autoregressive,
    run_factorised,
)

COLUMNS = {  # the table's columns per part: results key -> header
    "3a": {"precision": "precision", "coverage": "modes covered", "sd": "sd of q (median)",
           "broad": "broad (sd > 6)", "between": "mean between modes",
           "forward_kl": "KL(p‖q)", "reverse_kl": "KL(q‖p)", "upper_mode_frac": "upper mode"},
    "3b-fact": {"precision": "precision", "recall": "recall", "marginal_entropy": "H(q_t)/log 8",
                "reverse_kl": "KL(q‖p) seq", "forward_kl": "KL(p‖q) seq"},
    "3b-ar": {"precision": "precision", "recall": "recall", "mixed": "mixed",
              "mode_entropy": "mode entropy",
              "reverse_kl": "KL(q‖p) seq", "forward_kl": "KL(p‖q) seq",
              "empty_frac": "empty answers"},
}  # fmt: skip
COLUMNS["3a-floor"] = COLUMNS["3a"]


@dataclass
class Settings:
    seeds: int = 3
    parts: tuple[str, ...] = ("3a", "3a-floor", "3b-fact", "3b-ar")
    bimodal: Bimodal = field(default_factory=Bimodal)
    strings: Strings = field(default_factory=Strings)
    ar: Autoregressive = field(default_factory=Autoregressive)
    arms: dict[str, list[Arm]] = field(default_factory=lambda: {
        "3a": ARMS_3A, "3b-fact": ARMS_FACT, "3b-ar": ARMS_AR,
        "3a-floor": [a for a in ARMS_3A if a.name in ("forward_kl", "reverse_kl", "pg")],
    })  # fmt: skip


def quick_settings(seeds: int) -> Settings:
    """The CI configuration: 3a and 3b-fact with the arms whose ordering the test asserts."""
    keep = {"3a": ("forward_kl", "jsd_0.5", "reverse_kl", "pg"),
            "3b-fact": ("sft", "pg_discount_0", "pg_discount_1")}  # fmt: skip
    full = Settings()
    arms = {p: [a for a in full.arms[p] if a.name in names] for p, names in keep.items()}
    return Settings(seeds=seeds, parts=("3a", "3b-fact"), arms=arms)


def run_part(part: str, s: Settings, out: Path) -> dict:
    """Every arm and seed of one part: per-seed metrics, their mean and std, and the config."""
    results: dict = {}
    teachers = {}
    if part == "3b-ar":  # one warm-started student per seed, shared by every arm
        for seed in range(s.seeds):
            folder = out / "ar" / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            teachers[seed] = prepare_autoregressive(s.ar, s.strings, folder, seed)
    for arm in s.arms[part]:
        rows = []
        for seed in range(s.seeds):
            t0, c0 = time.perf_counter(), cpu_seconds()
            if part == "3a":
                m = run_bimodal(arm, s.bimodal, seed)
            elif part == "3a-floor":
                m = run_bimodal(arm, replace(s.bimodal, floor=1e-3), seed)
            elif part == "3b-fact":
                m = run_factorised(arm, s.strings, seed)
            else:
                m = run_autoregressive(arm, s.ar, s.strings, seed, out / "ar" / f"seed{seed}",
                                       teachers[seed])  # fmt: skip
            m["cpu_s"], m["wall_s"] = cpu_seconds() - c0, time.perf_counter() - t0
            rows.append(m)
            shown = " ".join(f"{k}={m[k]:.3f}" for k in COLUMNS[part])
            print(f"[{part}] {arm.name:16s} seed {seed}: {shown} ({m['cpu_s']:.1f} s cpu)",
                  flush=True)  # fmt: skip
        results[arm.name] = summarise(rows) | {"config": arm_config(part, arm, s, rows)}
    return results


def arm_config(part: str, arm: Arm, s: Settings, rows: list[dict]) -> dict:
    cfg = {"arm": asdict(arm)}
    if part.startswith("3a"):
        cfg["bimodal"] = asdict(s.bimodal) | ({"floor": 1e-3} if part == "3a-floor" else {})
    else:
        cfg["strings"] = asdict(s.strings)
    if part == "3b-ar":
        cfg["autoregressive"] = asdict(s.ar)
        cfg["kdrl_config_seed0"] = rows[0].pop("config")
        for r in rows[1:]:
            r.pop("config")
    return cfg


def summarise(rows: list[dict]) -> dict:
    """Mean and sample std over seeds of each number; a metric that is undefined (nan) for a
    seed (mode entropy with no sample near any string) is averaged over the other seeds, and
    ``n`` says over how many."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    mean, std, n = {}, {}, {}
    for k in keys:
        xs = [r[k] for r in rows if not math.isnan(r[k])]
        n[k] = len(xs)
        mean[k] = sum(xs) / len(xs) if xs else math.nan
        std[k] = math.sqrt(sum((x - mean[k]) ** 2 for x in xs) / max(len(xs) - 1, 1))
    return {"seeds": rows, "mean": mean, "std": std, "n": n}


def cell(r: dict, key: str) -> str:
    if r["n"][key] == 0:
        return "n/a"
    text = f"{r['mean'][key]:.3f} ± {r['std'][key]:.3f}"
    return text if r["n"][key] == len(r["seeds"]) else f"{text} ({r['n'][key]} seeds)"


def markdown(results: dict) -> str:
    lines = []
    for part, arms in results["parts"].items():
        cols = COLUMNS[part]
        rows = [[name, *(cell(r, k) for k in cols)] for name, r in arms.items()]
        lines += [f"### {part}", "", markdown_table(["arm", *cols.values()], rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (3; --quick: 1)")
    ap.add_argument("--out", default="runs/exp-divergences", help="run folder")
    ap.add_argument("--quick", action="store_true", help="the CI configuration (3a, 3b-fact)")
    ap.add_argument(
        "--parts", default=None, help="comma-separated subset of 3a,3a-floor,3b-fact,3b-ar"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    s = quick_settings(args.seeds or 1) if args.quick else Settings(seeds=args.seeds or 3)
    if args.parts:
        s.parts = tuple(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python", *sys.argv]), "seeds": s.seeds, "parts": {},
                     "time": {}}  # fmt: skip
    for part in s.parts:
        t0, c0 = time.perf_counter(), cpu_seconds()
        results["parts"][part] = run_part(part, s, out)
        results["time"][part] = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}
    results["time"]["total"] = {"cpu_s": cpu_seconds()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot_all(results, out)
    print(table)
    print("time:", {k: {u: round(x, 1) for u, x in v.items()} for k, v in results["time"].items()})
    return results


if __name__ == "__main__":
    main()
