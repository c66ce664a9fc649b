"""GPU check for a lent CUDA machine (about 2 minutes): the kdrl code paths that only a GPU can
exercise. Runs from a plain checkout with PYTHONPATH=src on the machine's own torch and
transformers (nothing is installed there). Writes a JSON summary to $OUT (or ./gpu_check.json).

    PYTHONPATH=src python3 scripts/gpu_check.py [--device cuda]

Checks: chunked log-probs and divergences on the device equal the CPU float64 answer (float32
and bf16 logits); three training steps of pure KD and of KDRL on the device are finite, move
the weights and save a checkpoint that loads on the CPU; micro-batching does not change the
update on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def check_math(device: str) -> dict:
    from kdrl.divergences import full_divergence_loss
    from kdrl.logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 33, 4099, generator=g)
    ids = torch.randint(0, 4099, (64, 33), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(device, dtype).requires_grad_(True)
        lp, _ = token_logprobs(
            x, ids.to(device), temperature=1.0, with_entropy=True, chunk_rows=100
        )
        lp.sum().backward()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        out[f"logprobs_{dtype}_max_err"] = (lp.double().cpu() - ref).abs().max().item()
        assert out[f"logprobs_{dtype}_max_err"] < tol, out
        assert torch.isfinite(x.grad).all()
    teacher = 3 * torch.randn(64, 33, 4099, generator=g)
    mask = torch.rand(64, 33, generator=g) > 0.2
    kw = dict(
        kind="jsd", beta=0.3, student_temperature=0.8, teacher_temperature=1.2, num_tokens=100.0
    )
    cpu = full_divergence_loss(logits.double(), teacher.double(), mask, **kw).item()
    dev = full_divergence_loss(logits.to(device), teacher.to(device), mask.to(device), **kw).item()
    out["jsd_rel_err"] = abs(dev - cpu) / abs(cpu)
    assert out["jsd_rel_err"] < 1e-5, out
    return out


def tiny_pair(root: Path) -> tuple[Path, Path, Path]:
    from kdrl.prune import prune_decoder_layers
    from kdrl.tiny import char_tokenizer, fit_tiny, save_tiny, tiny_causal_lm

    tok = char_tokenizer()
    teacher = tiny_causal_lm(tok, hidden=64, layers=4, seed=0)
    texts = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)]
    fit_tiny(teacher, tok, texts, steps=60, lr=1e-2)
    save_tiny(root / "teacher", tok, teacher)
    save_tiny(root / "student", tok, prune_decoder_layers(teacher, [0, 3]))
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))  # fmt: skip
    return root / "student", root / "teacher", data


def check_training(device: str, root: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kdrl.config import load_config
    from kdrl.metrics import read_metrics
    from kdrl.train import train

    student, teacher, data = tiny_pair(root)
    out = {}
    for name, extra in {
        "kd": ["teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1", "reward.fn=none"],
        "kdrl": ["reward.fn=exact_match", "teacher.distill_loss_weight=0.5",
                 "train.ppo_n_minibatches=2"],
        "kd_full_jsd": ["teacher.rl_loss_weight=0", "reward.fn=none", "teacher.kd_estimator=jsd",
                        "teacher.top_k=16", "teacher.distill_loss_weight=1"],
        "kd_bf16_teacher_mb": ["teacher.rl_loss_weight=0", "reward.fn=none",
                               "teacher.dtype=bfloat16", "train.mb_spec.max_tokens_per_mb=64"],
    }.items():  # fmt: skip
        run = root / name
        cfg = load_config(None, [
            f"student.path={student}", f"teacher.path={teacher}", f"data.path={data}",
            "data.answer_field=answer", "data.chat_template=false", f"train.device={device}",
            f"train.output_dir={run}", "train.batch_size=8", "rollout.n_samples=4",
            "rollout.max_new_tokens=6", "train.max_steps=3", "optim.lr=1e-3",
            f"eval.path={data}", "eval.max_prompts=16", "train.tensorboard=false",
            "teacher.dtype=float32", *extra,
        ])  # fmt: skip
        t = time.perf_counter()
        final = train(cfg)
        rows = read_metrics(run / "metrics.jsonl")
        moved = any(not torch.equal(a, b) for a, b in zip(
            load_file(student / "model.safetensors").values(),
            load_file(final / "model.safetensors").values(), strict=True))  # fmt: skip
        finite = all(r.get("nonfinite") is None for r in rows)
        AutoModelForCausalLM.from_pretrained(final)  # loads on the CPU
        last = {k: v for k, v in rows[-1].items() if k.startswith(("loss", "eval", "kd/"))}
        seconds = round(time.perf_counter() - t, 1)
        out[name] = {"seconds": seconds, "moved": moved, "finite": finite, "last": last}
        assert moved and finite, out[name]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import transformers

    result: dict = {"device": args.device, "torch": torch.__version__,
                    "transformers": transformers.__version__}  # fmt: skip
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    failures = 0
    checks = {
        "math": lambda: check_math(args.device),
        "training": lambda: check_training(args.device, Path(tempfile.mkdtemp())),
    }
    for name, fn in checks.items():
        try:
            result[name] = fn()
            result[name + "_ok"] = True
        except Exception as err:  # report every check, then fail
            failures += 1
            result[name + "_ok"] = False
            result[name + "_error"] = f"{type(err).__name__}: {err}"
    text = json.dumps(result, indent=2, default=str)
    print(text)
    Path(os.environ.get("OUT", "."), "gpu_check.json").write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
