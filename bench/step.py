"""Where one kdrl training step spends its time, against this machine's own matmul ceiling.

    .venv/bin/python bench/step.py [--pairs demo,synthetic] [--steps 3] [--threads 2]
        [--set KEY=VALUE ...] [--json bench/results/step.json]

For each model pair (``demo``: SmolLM2-135M-Instruct teacher and its 4-layer pruned student,
as ``make demo`` prepares them; ``synthetic``: the tiny adder pair of ``kdrl demo --synthetic``)
a fresh subprocess builds a kdrl run from the pair's example config, runs one warm-up step, then
``--steps`` timed steps, and reports per phase (rollout = sampling, teacher = scoring,
update = the student's forward/backward/optimizer step): seconds, the floating-point work done
(counted once with ``torch.utils.flop_counter.FlopCounterMode`` on one extra step: matmuls and
attention, i.e. what a FLOP ceiling is about), the achieved GFLOP/s and its share of the
ceiling, response tokens per second, and the subprocess's peak RSS.

The ceiling is measured in the same run, with the same thread count, before and after the
pairs run (the better of the two counts): the best of several square float32 matmuls (and
bfloat16 where the CPU has native bf16: avx512_bf16 or AMX), and the memory bandwidth (best
large tensor copy). From them, each phase gets a *floor*: its counted
FLOPs at the ceiling, and for the rollout at least the student's weights read once per decode
step at that bandwidth (batched decoding is bandwidth-bound). The floor is a lower bound, not an
estimate. ``--set`` passes config overrides to every pair (e.g. the vs_trl.py workload:
``--set train.batch_size=8 rollout.n_samples=1 rollout.max_new_tokens=64``).
Results go to ``bench/results/step.json`` (``--json``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PHASES = ("rollout", "teacher", "update")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul at the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def measure_ceiling() -> dict[str, float]:
    ceiling = {"float32": matmul_ceiling(torch.float32)}
    if native_bf16():
        ceiling["bfloat16"] = matmul_ceiling(torch.bfloat16)
    return ceiling


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Best GB/s (bytes read + written) of a ``mib``-MiB tensor copy at the current threads."""
    a = torch.ones(mib * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best / 1e9


def pair_config(pair: str, out: Path, threads: int, extra: list[str]):
    from kdrl.config import load_config
    from kdrl.demo.run import prepare

    config, prepared = prepare(synthetic=pair == "synthetic")
    overrides = [*prepared, f"train.output_dir={out}", "train.tensorboard=false",
                 f"train.threads={threads}", "eval.path=''", "train.max_steps=1000",
                 *extra]  # fmt: skip
    return load_config(config, overrides)


def run_pair(pair: str, steps: int, threads: int, out: Path, extra: list[str]) -> dict:
    """In this (fresh) process: time ``steps`` steps of ``pair`` and count their FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    import kdrl.train as T

    cfg = pair_config(pair, out, threads, extra)
    run = T.build(cfg, out, None)
    T.train_step(run)  # warm-up
    rows = [T.train_step(run) for _ in range(steps)]
    # One more step under the FLOP counter, phase by phase (counting slows it: not timed).
    flops = dict.fromkeys(PHASES, 0)
    counters = {}

    def counted(phase, fn):
        def wrapper(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                result = fn(*args, **kwargs)
            flops[phase] += counter.get_total_flops()
            counters[phase] = counter
            return result

        return wrapper

    run.rollout.generate = counted("rollout", run.rollout.generate)
    run.teacher.score = counted("teacher", run.teacher.score)
    T.policy_update = counted("update", T.policy_update)
    counted_row = T.train_step(run)
    tokens = statistics.median(r["perf/response_tokens_per_s"] * r["time/step"] for r in rows)
    result = {"pair": pair, "steps": steps, "threads": threads,
              "sequences_per_step": cfg.train.batch_size * cfg.rollout.n_samples,
              "max_new_tokens": cfg.rollout.max_new_tokens, "overrides": extra,
              "student_weight_bytes": sum(p.numel() * p.element_size()
                                          for p in run.model.parameters()),
              "response_tokens_per_step": tokens,
              "counted_step_response_tokens": counted_row["perf/response_tokens_per_s"]
              * counted_row["time/step"]}  # fmt: skip
    for phase in PHASES:
        seconds = statistics.median(r[f"time/{phase}"] for r in rows)
        result[phase] = {"seconds": seconds, "gflop": flops[phase] / 1e9}
    result["step_seconds"] = statistics.median(r["time/step"] for r in rows)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(json.dumps(run_pair(args.child, args.steps, args.threads, out, args.set)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="demo,synthetic")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/bench-step", help="scratch run directory")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every pair"
    )
    parser.add_argument("--json", default=str(RESULTS / "step.json"), help="results file")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    torch.set_num_threads(args.threads)
    ceiling = measure_ceiling()
    print(f"matmul ceiling, {args.threads} threads: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceiling.items())
          + f" (CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{native_bf16()})")  # fmt: skip
    bandwidth = copy_bandwidth()
    print(f"memory bandwidth (tensor copy), {args.threads} threads: {bandwidth:.1f} GB/s")
    results = []
    for pair in args.pairs.split(","):
        out = Path(args.out) / f"{pair}-{time.strftime('%H%M%S')}"
        cmd = [sys.executable, __file__, "--child", pair, "--steps", str(args.steps),
               "--threads", str(args.threads), "--out", str(out), "--set", *args.set]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{pair} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # The clock moves with load and temperature: the ceiling is the best of a measurement before
    # the runs and one after, so a slow first reading cannot flatter the phases.
    after = measure_ceiling()
    print("matmul ceiling after the runs: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in after.items()))  # fmt: skip
    ceiling = {k: max(v, after[k]) for k, v in ceiling.items()}
    dtype = "float32"  # every shipped CPU config trains in float32
    print(f"\n{'pair':<10} {'phase':<8} {'s/step':>7} {'GFLOP':>8} {'GFLOP/s':>8} "
          f"{'% ceiling':>9} {'floor s':>8}")  # fmt: skip
    for r in results:
        for phase in PHASES:
            p = r[phase]
            rate = p["gflop"] / p["seconds"] if p["seconds"] else 0.0
            p["gflops_per_s"], p["share_of_ceiling"] = rate, rate / ceiling[dtype]
            p["floor_seconds"] = p["gflop"] / ceiling[dtype]
            if phase == "rollout":  # every decode step reads the student's weights once
                read = r["max_new_tokens"] * r["student_weight_bytes"] / 1e9 / bandwidth
                p["floor_seconds"] = max(p["floor_seconds"], read)
            print(f"{r['pair']:<10} {phase:<8} {p['seconds']:>7.3f} {p['gflop']:>8.1f} "
                  f"{rate:>8.1f} {100 * rate / ceiling[dtype]:>8.1f}% "
                  f"{p['floor_seconds']:>8.3f}")  # fmt: skip
        r["floor_seconds"] = sum(r[phase]["floor_seconds"] for phase in PHASES)
        print(f"{r['pair']:<10} {'step':<8} {r['step_seconds']:>7.3f} "
              f"{'':>28} {r['floor_seconds']:>8.3f}")  # fmt: skip
        print(f"{'':<10} {'':<8} {'':>7}   "
              f"{r['response_tokens_per_step'] / r['step_seconds']:.0f} response tokens/s, "
              f"{r['sequences_per_step']} sequences x <= {r['max_new_tokens']} new tokens, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    payload = {"ceiling_gflops": ceiling, "bandwidth_gb_per_s": bandwidth,
               "threads": args.threads, "dtype": dtype,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "native_bf16": native_bf16(), "pairs": results}  # fmt: skip
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
