"""Rewrite tests/golden/tiny_kd_grpo.json from a fresh run of tests/golden_run.py, and print how
every stored value moved (old -> new, with the relative change).

    python scripts/regen_golden.py           # rewrite the file
    python scripts/regen_golden.py --check   # only compare: exit 1 past the tolerance

A commit that changes a golden file must say what changed in the math and why the new numbers
are right: see tests/golden/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import golden_run  # lives in tests/, put on the path above


def _relative(old: float, new: float) -> str:
    return f"{(new - old) / abs(old):+.2e}" if old else f"{new - old:+.2e} abs"


def _change(old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list):  # the overrides: name what moved
        gone, came = [x for x in old if x not in new], [x for x in new if x not in old]
        return " ".join([*(f"-{x!r}" for x in gone), *(f"+{x!r}" for x in came)]) or "reordered"
    return f"{old!r} -> {new!r}"


def describe(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Lines saying what differs between two golden documents: settings first, then every
    stored value that moved (old -> new, relative change), then how many stayed exactly."""
    if old is None:
        return [f"no golden file yet: {len(new['steps'])} steps of {', '.join(new['metrics'])}"]
    lines = []
    for part in ("config", "tolerance", "versions", "steps"):
        before, after = old.get(part), new[part]
        if isinstance(before, dict) and isinstance(after, dict):
            for key in [*after, *(k for k in before if k not in after)]:
                if before.get(key) != after.get(key):
                    lines.append(f"{part}.{key}: {_change(before.get(key), after.get(key))}")
        elif before != after:
            lines.append(f"{part}: {before!r} -> {after!r}")
    same = 0
    for key, values in new["metrics"].items():
        previous = old.get("metrics", {}).get(key, [])
        for i, value in enumerate(values):
            step = new["steps"][i]
            if i >= len(previous):
                lines.append(f"{key} step {step}: (none) -> {value!r}")
            elif previous[i] == value:
                same += 1
            else:
                change = _relative(previous[i], value)
                lines.append(f"{key} step {step}: {previous[i]!r} -> {value!r} ({change})")
    lines += [f"{key}: dropped" for key in old.get("metrics", {}) if key not in new["metrics"]]
    return [*lines, f"{same} stored values unchanged"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdrl-golden-") as tmp:
        root = golden_run.prepare(Path(tmp) / "inputs")
        golden_run.run(root, Path(tmp) / "run")
        rows = golden_run.read_rows(Path(tmp) / "run")
    new = golden_run.golden_document(rows)
    path = golden_run.GOLDEN_FILE
    old = json.loads(path.read_text()) if path.exists() else None
    print("\n".join(describe(old, new)))
    if args.check:
        if old is None:
            problems = ["no golden file"]
        else:
            problems = golden_run.mismatches(old, rows)
            if old["config"] != new["config"]:
                problems.insert(0, "the config differs from the golden file's")
        print("\n".join(problems) or f"{path.name}: every value within the tolerance")
        return 1 if problems else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
