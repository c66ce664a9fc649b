"""Measures how far two data-parallel ranks drift from one process through float32 rounding
alone, on the runs of tests/test_distributed.py and tests/test_nonfinite.py: the bound their
tolerances are derived from.

Runs each test's 4-step configuration once in one process and once on two ranks (FSDP2 and
DDP), each under every ``ATEN_CPU_CAPABILITY`` given (the machine's best by default, and
``avx2``), one thread per rank, and prints the largest relative difference of the loss-curve
and eval metrics (values above the test's absolute floor) and the largest absolute difference
of the final weights.

    .venv/bin/python scripts/measure_dp_rounding.py [--capability default avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from kdrl.metrics import read_metrics
    from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm
    from test_distributed import CURVE, overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", nargs="+", default=["default", "avx2"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dp-rounding-"))
    tok = char_tokenizer()  # the pair of tests/conftest.py
    student = save_tiny(root / "student", tok, tiny_causal_lm(tok, hidden=32, layers=2, seed=1))
    teacher = save_tiny(
        root / "teacher",
        tok,
        tiny_causal_lm(tok, hidden=48, layers=3, vocab_rows=len(tok) + 5, seed=2),
    )
    # tests/test_nonfinite.py's teacher: the embedding of "7" is nan.
    seven = tiny_causal_lm(tok, hidden=48, layers=3, seed=2)
    with torch.no_grad():
        seven.get_input_embeddings().weight[tok.convert_tokens_to_ids("7")] = float("nan")
    seven_teacher = save_tiny(root / "seven", tok, seven)  # fmt: skip
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    data = (root / "train.jsonl", root / "eval.jsonl")
    data[0].write_text("".join(json.dumps(r) + "\n" for r in rows))
    data[1].write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    runs = {  # name: (overrides, metric keys), as in the tests
        "test_distributed": (
            lambda out, *x: overrides((student, teacher), data, out, *x),
            [*CURVE, "eval/reverse_kl", "eval/accuracy"],
        ),
        "test_nonfinite": (
            lambda out, *x: overrides(
                (student, seven_teacher), (data[0], data[0]), out, "train.skip_nonfinite=true",
                "train.max_skipped_steps=100", 'eval.path=""', *x,
            ),
            list(CURVE),
        ),
    }  # fmt: skip

    def launch(args: list[str], ranks: int, capability: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if capability != "default":
            env["ATEN_CPU_CAPABILITY"] = capability
        prefix = [sys.executable, "-m"]
        if ranks > 1:
            prefix += ["torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"]
        subprocess.run([*prefix, "kdrl", "train", *args], env=env, check=True, capture_output=True)

    for capability in args.capability:
        for name, (make_args, keys) in runs.items():
            single = root / capability / name / "single"
            launch(make_args(single), 1, capability)
            for parallel in ("fsdp", "ddp"):
                out = root / capability / name / parallel
                launch(make_args(out, f"train.parallel={parallel}"), 2, capability)
                rel, worst = _curve_drift(read_metrics(single), read_metrics(out), keys)
                last = "checkpoints/step-00000004/model.safetensors"
                wa, wb = load_file(single / last), load_file(out / last)
                weights = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
                print(f"{capability:8s} {name} {parallel}: metrics {rel:.2e} of scale ({worst}), "
                      f"weights abs {weights:.2e}", flush=True)  # fmt: skip


def _curve_drift(one: list[dict], two: list[dict], keys: list[str]) -> tuple[float, str]:
    """Largest |difference| relative to the key's largest magnitude over the run: a loss that
    crosses zero has no meaningful relative error at the crossing."""
    rel, worst = 0.0, ""
    for key in keys:
        scale = max((abs(r[key]) for r in one if r.get(key) is not None), default=0.0)
        for a, b in zip(one, two, strict=True):
            if a.get(key) is not None and scale > 0 and abs(a[key] - b[key]) / scale > rel:
                rel, worst = abs(a[key] - b[key]) / scale, f"{key} step {a['step']}"
    return rel, worst


if __name__ == "__main__":
    main()
