"""The fixed tiny training run behind the determinism test and the golden loss file.

A random 2-layer student and a larger random 3-layer teacher (whose embedding has 5 padded
rows), 24 prompts ``"3+1="``, 4 steps of 4 prompts x 4 samples with both loss terms on: the
default sampled-token distillation estimator (``pg``) and GRPO, whose graded reward (the share
of digits in a completion, `digit_share`) varies within a group so the advantages are not all
zero, and two minibatches per step so the second one is off-policy (ratio != 1, clipping).
Everything runs in float32 on the CPU, so the numbers do not depend on a GPU or on a CPU's
bfloat16 support.

Used three ways:

- ``python tests/golden_run.py OUT seed:threads ...`` trains one run per argument in one fresh
  process (``OUT/s1-t1`` ...); tests/test_determinism.py starts it twice and compares.
- `golden_document` / `GOLDEN_FILE`: what tests/golden/tiny_kd_grpo.json holds.
- scripts/regen_golden.py rewrites that file from a fresh run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

NAME = "tiny_kd_grpo"
GOLDEN_FILE = Path(__file__).parent / "golden" / f"{NAME}.json"
SEED = 1
THREADS = 1
"""The golden file's run: the config's seed, and one torch thread."""
KEYS = (
    "loss/total",
    "loss/kd",
    "loss/grpo",
    "rollout/reverse_kl",
    "reward/mean",
    "optim/grad_norm",
)
"""The per-step metrics the golden file stores (and the only ones its test compares)."""
REL_TOL = 1e-5
ABS_TOL = 1e-6
"""Golden tolerance: see tests/golden/README.md for why it is not exact equality. Measured
against the file (written on an AVX2 machine) with `python scripts/regen_golden.py --check` on
an AVX-512/AMX machine: at most 1.6e-6 relative with torch's AVX-512 kernels, 3.6e-7 under
ATEN_CPU_CAPABILITY=avx2, the same with 1 and 2 threads (the run pins one)."""
VOLATILE_PREFIXES = ("time/", "perf/")
"""Metric keys that measure the machine, not the math: left out of every comparison."""


def digit_share(completion: str, answer: str | None) -> float:
    """The share of a completion's characters that are digits: a graded reward that random
    models earn unevenly, so GRPO groups get non-zero advantages."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


STUDENT = {"hidden": 32, "layers": 2, "seed": 1}
TEACHER = {"hidden": 48, "layers": 3, "seed": 2, "padded_rows": 5}
"""`kdrl.tiny.tiny_causal_lm` settings (on `kdrl.tiny.char_tokenizer()`) of the two models."""
PROMPTS = {"a": [1, 8], "b": [0, 2]}
"""Every prompt ``"{a}+{b}="`` (answer ``a + b``) for ``a`` and ``b`` in these closed ranges."""


def prepare(root: Path) -> Path:
    """Write the models and prompts under ``root`` (the same bytes every time); returns root."""
    from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm

    tok = char_tokenizer()
    s, t = STUDENT, TEACHER
    student = tiny_causal_lm(tok, hidden=s["hidden"], layers=s["layers"], seed=s["seed"])
    teacher = tiny_causal_lm(tok, hidden=t["hidden"], layers=t["layers"], seed=t["seed"],
                             vocab_rows=len(tok) + t["padded_rows"])  # fmt: skip
    save_tiny(root / "student", tok, student)
    save_tiny(root / "teacher", tok, teacher)
    (a0, a1), (b0, b1) = PROMPTS["a"], PROMPTS["b"]
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for a in range(a0, a1 + 1)
        for b in range(b0, b1 + 1)
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def overrides() -> list[str]:
    """The run's config as dotted overrides, without the paths (those are per machine)."""
    return [
        "student.dtype=float32", "teacher.dtype=float32", "train.device=cpu",
        "data.answer_field=answer", "data.chat_template=false",
        "reward.fn=golden_run:digit_share",
        "teacher.rl_loss_weight=1.0", "teacher.distill_loss_weight=0.5",
        "rollout.n_samples=4", "rollout.max_new_tokens=8", "rollout.temperature=1.0",
        "train.batch_size=4", "train.max_steps=4", "train.ppo_n_minibatches=2",
        "optim.lr=1e-2", "optim.warmup_steps=1", "optim.lr_schedule=cosine",
        "train.tensorboard=false", "train.save_every_steps=0",
    ]  # fmt: skip


def run(root: Path, out: Path, *, seed: int = SEED, threads: int = THREADS) -> Path:
    """Train the golden config on the files `prepare` wrote; returns the final model folder."""
    import torch

    from kdrl.config import load_config
    from kdrl.train import train

    paths = [
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        f"data.path={root / 'prompts.jsonl'}", f"train.output_dir={out}",
    ]  # fmt: skip
    saved = torch.get_num_threads()
    try:  # train.threads is process-wide: leave the caller's setting as it was
        return train(load_config(None, [*paths, *overrides(), f"seed={seed}",
                                        f"train.threads={threads}"]))  # fmt: skip
    finally:
        torch.set_num_threads(saved)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` of a run, without the keys that measure the machine."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE_PREFIXES)}
        for line in lines
    ]


def golden_values(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``{key: [value at step 1, 2, ...]}`` for each of `KEYS`."""
    return {key: [row[key] for row in rows] for key in KEYS}


def golden_config() -> dict[str, Any]:
    """Everything the golden numbers follow from, as the golden file records it."""
    return {
        "student": STUDENT, "teacher": TEACHER, "prompts": PROMPTS, "seed": SEED,
        "threads": THREADS,
        "overrides": overrides(),
    }  # fmt: skip


def golden_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The golden file's contents for a run's metrics rows."""
    from importlib.metadata import version

    return {
        "about": "Per-step metrics of the run in tests/golden_run.py. Rules and the tolerance: "
        "tests/golden/README.md. Regenerate: python scripts/regen_golden.py",
        "config": golden_config(),
        "tolerance": {"rel": REL_TOL, "abs": ABS_TOL},
        "versions": {name: version(name) for name in ("torch", "transformers")},
        "steps": [row["step"] for row in rows],
        "metrics": golden_values(rows),
    }


def mismatches(golden: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """How a run's metrics rows differ from a golden document beyond its tolerance, one line per
    value; only the keys the golden file holds are compared."""
    steps = [row["step"] for row in rows]
    if steps != golden["steps"]:
        return [f"steps {steps} != golden steps {golden['steps']}"]
    rel, abs_ = golden["tolerance"]["rel"], golden["tolerance"]["abs"]
    problems = []
    for key, expected in golden["metrics"].items():
        for step, row, want in zip(steps, rows, expected, strict=True):
            got = row.get(key)
            if got is None or not math.isclose(got, want, rel_tol=rel, abs_tol=abs_):
                problems.append(f"step {step} {key}: {got!r} != golden {want!r}")
    return problems


def main(argv: list[str]) -> int:
    """``golden_run.py OUT SEED:THREADS ...``: prepare under OUT, then one run per argument."""
    out, specs = Path(argv[0]), argv[1:]
    prepare(out / "inputs")
    for spec in specs:
        seed, threads = (int(part) for part in spec.split(":"))
        run(out / "inputs", out / f"s{seed}-t{threads}", seed=seed, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
