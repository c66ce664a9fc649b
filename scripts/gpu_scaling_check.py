"""Check the scale-out paths on a GPU machine in a few minutes (docs/scaling.md).

    PYTHONPATH=src python scripts/gpu_scaling_check.py [--device cuda] [--out DIR]

Builds a small Llama pair offline, then:
  1. trains 3 steps with the in-process teacher on the GPU;
  2. serves the teacher with `kdrl serve-teacher` on the GPU and trains the same 3 steps with
     `teacher.backend=http` (needs starlette + uvicorn): the losses must match step 1;
  3. with 2+ GPUs, trains the same steps under `torchrun --nproc_per_node 2` (NCCL, FSDP2):
     the losses must match step 1;
  4. with vLLM installed, samples with `rollout.backend=vllm` and checks its recorded
     log-probs against the trainer's forward pass, before and after a weight push.
A check whose requirement is missing is reported as skipped, not passed. Exit 1 on a failure.
Also runs on a CPU (`--device cpu`), which is how it was tried before a GPU was lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from kdrl.metrics import read_metrics
from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm

KEYS = ("loss/total", "loss/kd", "rollout/reverse_kl", "optim/grad_norm")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def make_pair(root: Path) -> tuple[Path, Path, Path]:
    tok = char_tokenizer()
    student = save_tiny(root / "student", tok, tiny_causal_lm(tok, hidden=128, layers=2, seed=1))
    teacher = save_tiny(root / "teacher", tok, tiny_causal_lm(tok, hidden=256, layers=4, seed=2))
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return student, teacher, data


def overrides(student: Path, data: Path, out: Path, device: str, *extra: str) -> list[str]:
    return [
        f"student.path={student}", f"data.path={data}", "data.answer_field=answer",
        "reward.fn=exact_match", "data.chat_template=false", f"train.output_dir={out}",
        "train.batch_size=4", "rollout.n_samples=4", "rollout.max_new_tokens=16",
        "optim.lr=1e-3", "train.tensorboard=false", "teacher.distill_loss_weight=0.5",
        "train.max_steps=3", f"train.device={device}", *extra,
    ]  # fmt: skip


def curve(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def same_curve(a: list[dict], b: list[dict], rel: float = 1e-4) -> tuple[bool, float]:
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            worst = max(worst, abs(ra[key] - rb[key]) / max(abs(ra[key]), 1e-6))
    return worst <= rel, worst


def kdrl_train(args: list[str], *, torchrun: int = 0) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m"]
    if torchrun:
        prefix += ["torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"]
    return subprocess.run([*prefix, "kdrl", "train", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def check_http(teacher: Path, base: list[str], out: Path, device: str, local: list[dict]):
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        return {"status": "skipped", "why": f"{err} (pip install 'kdrl[serve]')"}
    port = 8765
    vocab = str(len(char_tokenizer()))
    server = subprocess.Popen([sys.executable, "-m", "kdrl", "serve-teacher", "--model",
                               str(teacher), "--port", str(port), "--device", device,
                               "--vocab", vocab, "--log-level", "warning"], env=ENV)  # fmt: skip
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        proc = kdrl_train([*base, "teacher.backend=http", f"teacher.url=http://127.0.0.1:{port}"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    if proc.returncode:
        return {"status": "failed", "stderr": proc.stderr[-3000:]}
    ok, worst = same_curve(local, curve(out))
    return {"status": "passed" if ok else "failed", "max_rel_diff_vs_local": worst}


def check_torchrun(base: list[str], out: Path, local: list[dict]):
    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "why": f"{torch.cuda.device_count()} GPU(s); NCCL needs 2"}
    proc = kdrl_train([*base, "train.parallel=fsdp"], torchrun=2)
    if proc.returncode:
        return {"status": "failed", "stderr": proc.stderr[-3000:]}
    ok, worst = same_curve(local, curve(out))
    return {"status": "passed" if ok else "failed", "max_rel_diff_vs_single": worst}


def check_vllm(student: Path, device: str):
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return {"status": "skipped", "why": f"vllm not installed ({err})"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdrl.data import Prompt
    from kdrl.logprobs import token_logprobs
    from kdrl.rollout_vllm import VLLMRollout

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).to(device)
    rollout = VLLMRollout(
        student, tok, temperature=1.0, top_p=1.0, max_new_tokens=16, dtype=torch.float32,
        max_model_len=64, gpu_memory_utilization=0.2,
    )  # fmt: skip
    prompts = [Prompt(index=i, text=f"{i}+1=", ids=tok(f"{i}+1=")["input_ids"], answer=None,
                      truncated=False) for i in range(8)]  # fmt: skip

    def worst_gap() -> float:
        batch = rollout.generate(prompts, n_samples=2, seed=3)
        ids = batch.input_ids_BT.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=batch.attention_mask_BT.to(device)).logits
        lp, _ = token_logprobs(logits[:, :-1], ids[:, 1:], temperature=1.0)
        mask = batch.response_mask_BT[:, 1:]
        return float((lp.cpu()[mask] - batch.behav_logprobs_BT[:, 1:][mask]).abs().max())

    before = worst_gap()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rollout.sync_weights(model)
    after = worst_gap()
    ok = before < 1e-3 and after < 1e-3
    return {"status": "passed" if ok else "failed", "max_abs_logprob_gap": [before, after]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="kdrl-scaling-"))
    student, teacher, data = make_pair(root)
    results: dict[str, dict] = {}

    base_local = overrides(student, data, root / "local", args.device, f"teacher.path={teacher}")
    proc = kdrl_train(base_local)
    if proc.returncode:
        print(proc.stderr[-3000:])
        return 1
    local = curve(root / "local")
    results["local_teacher"] = {"status": "passed", "steps": len(local)}
    base_http = overrides(student, data, root / "http", args.device)
    results["http_teacher"] = check_http(teacher, base_http, root / "http", args.device, local)
    base_dp = overrides(student, data, root / "dp", args.device, f"teacher.path={teacher}")
    results["torchrun_fsdp"] = check_torchrun(base_dp, root / "dp", local)
    results["vllm_rollout"] = check_vllm(student, args.device)
    results["seconds"] = {"status": "info", "value": round(time.perf_counter() - t0, 1)}
    results["device"] = {"status": "info", "value": torch.cuda.get_device_name(0)
                         if args.device.startswith("cuda") else "cpu"}  # fmt: skip
    print(json.dumps(results, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_scaling_check.json").write_text(json.dumps(results, indent=2))
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
