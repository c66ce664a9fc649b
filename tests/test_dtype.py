"""`auto` dtypes and the accuracy of a bfloat16 teacher against float32."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from kdrl.models import fast_bf16, load_teacher, resolve_dtype
from kdrl.teacher import LocalTeacher
from kdrl.tiny import char_tokenizer
from loopback import random_batch


def test_auto_is_bf16_only_where_it_is_native():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "teacher.dtype") == (
        torch.bfloat16 if fast_bf16(cpu) else torch.float32
    )
    assert resolve_dtype("float32", cpu, "teacher.dtype") == torch.float32


def test_bf16_teacher_scores_close_to_float32(tiny_pair):
    """What switching the teacher to bfloat16 costs in accuracy: the tiny teacher's log-probs of
    random sequences move by ~1e-3 nats (measured 0.0009 mean, 0.002 max on this machine)."""
    vocab = len(char_tokenizer())
    batch = random_batch(6, vocab, pad=0, seed=1)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        model = load_teacher(str(tiny_pair[1]), dtype=dtype)
        teacher = LocalTeacher(model, temperature=1.0, max_tokens_per_mb=4096, vocab=vocab)
        scores[dtype] = teacher.score(batch).logprobs_BT[batch.response_mask_BT]
    diff = (scores["bfloat16"] - scores["float32"]).abs()
    assert scores["float32"].abs().mean() > 1.0  # real log-probs, not zeros
    assert 0 < diff.mean() < 0.05 and diff.max() < 0.3, (diff.mean(), diff.max())


def test_torch_restricted_to_avx2_kernels_is_not_native_bf16():
    """With ``ATEN_CPU_CAPABILITY=avx2`` torch's bf16 kernels may fail even on an AVX-512 CPU
    with avx512_bf16 ("pack_vnni2 is only supported when avx512 is supported"): `auto` must
    then pick float32."""
    probe = (
        "import torch; from kdrl.models import fast_bf16; "
        "print(torch.backends.cpu.get_cpu_capability(), fast_bf16(torch.device('cpu')))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "False"], out.stdout
