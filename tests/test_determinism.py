"""Determinism: the same seed and config on the same machine give the same metrics and the same
weights bit for bit, in fresh processes, with 1 and with 2 torch threads; and the fixed tiny run
of tests/golden_run.py still gives the per-step numbers stored in tests/golden/.

The runs happen in two fresh processes (started together) that differ in what must not matter:
the string hash seed (the iteration order of sets of strings) and tokenizer parallelism. This
process imports no torch; it reads ``metrics.jsonl`` and the weight files' bytes.

Runs with 1 and with 2 threads happen to agree bit for bit on the machine this was written on
(the tensors are small); torch does not promise that, so between thread counts only the golden
tolerance is asserted (tests/golden/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import golden_run

DRIVER = Path(golden_run.__file__)
SAME = ("s1-t1", "s1-t2")
"""Runs both processes make: seed 1 with 1 and with 2 torch threads."""
OTHER_SEED = "s2-t1"
"""Made by the first process only: seed 2, to show the comparisons can fail."""


def spec(name: str) -> str:
    seed, threads = name[1:].split("-t")
    return f"{seed}:{threads}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``{"a/s1-t1": run_dir, ...}``: every run of both processes."""
    root = tmp_path_factory.mktemp("determinism")
    plans = {
        "a": ({"PYTHONHASHSEED": "1", "TOKENIZERS_PARALLELISM": "false"}, [*SAME, OTHER_SEED]),
        "b": ({"PYTHONHASHSEED": "2", "TOKENIZERS_PARALLELISM": "true"}, list(SAME)),
    }
    started = {}
    for name, (env, names) in plans.items():
        log = (root / f"{name}.log").open("w")
        command = [sys.executable, str(DRIVER), str(root / name), *map(spec, names)]
        started[name] = (subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                          stderr=subprocess.STDOUT), log)  # fmt: skip
    for name, (process, log) in started.items():
        code = process.wait(timeout=240)
        log.close()
        if code:
            tail = (root / f"{name}.log").read_text()[-3000:]
            pytest.fail(f"golden_run.py process {name} exited with {code}:\n{tail}")
    return {f"{p}/{n}": root / p / n for p, (_, names) in plans.items() for n in names}


def weights(run_dir: Path) -> bytes:
    (final,) = sorted((run_dir / "checkpoints").glob("step-*/model.safetensors"))[-1:]
    return final.read_bytes()


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """The first value that differs, in the order the run wrote them."""
    for ra, rb in zip(a, b, strict=False):
        for key in [*ra, *(k for k in rb if k not in ra)]:
            if ra.get(key) != rb.get(key):
                return f"step {ra.get('step')} {key}: {ra.get(key)!r} != {rb.get(key)!r}"
    return f"{len(a)} rows != {len(b)} rows"


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(golden_run.GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", SAME)
def test_same_seed_and_config_give_identical_metrics_and_weights(runs, name):
    a, b = golden_run.read_rows(runs[f"a/{name}"]), golden_run.read_rows(runs[f"b/{name}"])
    assert len(a) == 4 and {"loss/kd", "loss/grpo"} <= a[0].keys()
    if a != b:
        pytest.fail(f"{name}: same seed and config, different metrics: {first_difference(a, b)}")
    assert weights(runs[f"a/{name}"]) == weights(runs[f"b/{name}"]), f"{name}: weights differ"


def test_a_different_seed_gives_different_losses_and_weights(runs, golden):
    one, two = runs["a/s1-t1"], runs[f"a/{OTHER_SEED}"]
    rows_one, rows_two = golden_run.read_rows(one), golden_run.read_rows(two)
    losses = [[r["loss/total"] for r in rows] for rows in (rows_one, rows_two)]
    assert losses[0] != losses[1]
    assert weights(one) != weights(two)
    # The golden comparison notices it too (a changed sampling stream, like a changed loss).
    assert golden_run.mismatches(golden, rows_two)


def test_the_golden_file_describes_this_run(golden):
    assert golden["config"] == golden_run.golden_config(), (
        "tests/golden_run.py's config differs from the golden file's: run "
        "`python scripts/regen_golden.py` and explain the change in the commit "
        "(tests/golden/README.md)"
    )
    assert set(golden["metrics"]) == set(golden_run.KEYS)


@pytest.mark.parametrize("name", SAME)
def test_the_run_matches_the_golden_losses(runs, golden, name):
    # Only the keys the golden file holds are compared: new metrics do not need a new file.
    problems = golden_run.mismatches(golden, golden_run.read_rows(runs[f"a/{name}"]))
    versions = {lib: version(lib) for lib in ("torch", "transformers")}
    assert not problems, (
        f"{name} no longer matches {golden_run.GOLDEN_FILE.name} (recorded with "
        f"{golden['versions']}, running {versions}):\n" + "\n".join(problems) + "\nIf the math "
        "changed on purpose: `python scripts/regen_golden.py`, and explain it in the commit "
        "(tests/golden/README.md)."
    )
