"""`kdrl demo`: prepare the models (cached), distill, evaluate before and after, report.

The real demo distills SmolLM2-135M-Instruct into a layer-pruned copy of itself on the CPU; the
synthetic one (``--synthetic``) distills a tiny character-level adder, in seconds per step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kdrl.config import load_config

log = logging.getLogger("kdrl")

REPO_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def cache_dir() -> Path:
    """Where prepared demo models live: ``$KDRL_CACHE`` or ``~/.cache/kdrl``."""
    return Path(os.environ.get("KDRL_CACHE", Path.home() / ".cache" / "kdrl"))


def _config_file(name: str) -> Path:
    path = REPO_EXAMPLES / name
    if not path.is_file():
        raise ValueError(f"{path} is missing: kdrl demo runs from a clone of the repository")
    return path


def prepare(synthetic: bool) -> tuple[Path, list[str]]:
    """(config file, overrides pointing it at the prepared models and data)."""
    if synthetic:
        from kdrl.demo.synthetic import prepare_synthetic, synthetic_overrides

        paths = prepare_synthetic(cache_dir() / "synthetic")
        return _config_file("synthetic.yaml"), synthetic_overrides(paths, None)
    from kdrl.demo.smollm import convert_teacher, make_student

    teacher = convert_teacher(cache_dir() / "smollm2-135m-instruct")
    student = make_student(teacher, cache_dir() / "smollm2-135m-pruned-4")
    return _config_file("demo.yaml"), [f"teacher.path={teacher}", f"student.path={student}"]


def run_demo(overrides: list[str], *, synthetic: bool = False) -> Path:
    """Run the demo end to end; returns the run directory (which holds report.md)."""
    from kdrl.report import summary_table, write_report
    from kdrl.train import train

    start = time.perf_counter()
    config, prepared = prepare(synthetic)
    log.info("models ready in %.0f s", time.perf_counter() - start)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = load_config(config, [*prepared, *overrides])
    run_dir = Path(base.train.output_dir) / stamp
    cfg = load_config(config, [*prepared, *overrides, f"train.output_dir={run_dir}"])
    train(cfg)
    report = write_report(run_dir)
    print(summary_table(run_dir))
    print(f"report: {report}  (kdrl report {run_dir} regenerates it)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return run_dir
