"""Choosing the engines behind the loop's two seams from the config: who samples
(``rollout.backend``) and who scores (``teacher.backend``).

The loop only sees the :class:`kdrl.rollout.Rollout` and :class:`kdrl.teacher.Teacher`
protocols; this module is the one place that knows the concrete classes, and imports the
optional ones (vLLM) only when they are asked for.
"""

from __future__ import annotations

import logging

import torch

from kdrl.config import Config
from kdrl.models import load_teacher, load_tokenizer, support_size
from kdrl.preflight import check_models
from kdrl.rollout import HFRollout, Rollout
from kdrl.teacher import LocalTeacher, Teacher

log = logging.getLogger("kdrl")


def make_teacher(
    cfg: Config, student: torch.nn.Module, tokenizer, *, device: str
) -> tuple[torch.nn.Module | None, Teacher | None]:
    """``(teacher model, teacher)``: the model is only held for a local teacher (evaluation
    also uses it); a remote teacher is checked against the student's tokenizer at start."""
    t = cfg.teacher
    vocab = support_size(student, tokenizer)
    if t.backend == "http":
        from kdrl.teacher_http import HTTPTeacher

        teacher = HTTPTeacher(t.url, timeout_s=t.timeout_s, max_retries=t.max_retries)
        info = teacher.check(vocab, tokenizer, temperature=t.temperature)
        log.info("teacher: %s at %s", info.get("model"), t.url)
        return None, teacher
    if t.backend == "openai":
        from kdrl.teacher_openai import OpenAITeacher

        teacher = OpenAITeacher(
            t.url, t.path, temperature=t.temperature, timeout_s=t.timeout_s,
            max_retries=t.max_retries,
        )  # fmt: skip
        teacher.info()  # fails now, naming the URL and model, rather than at the first step
        log.info("teacher: %s at %s (OpenAI-compatible prompt log-probs)", t.path, t.url)
        return None, teacher
    if not t.path:
        return None, None
    model = load_teacher(t.path, dtype=t.dtype, device=device)
    teacher_tok = load_tokenizer(t.path, key="teacher.path")
    for warning in check_models(
        student, model, tokenizer, teacher_tok,
        student_name=cfg.student.path, teacher_name=t.path,
    ):  # fmt: skip
        log.warning("preflight: %s", warning)
    teacher = LocalTeacher(
        model, temperature=t.temperature, max_tokens_per_mb=t.mb_spec.max_tokens_per_mb,
        vocab=vocab,
    )  # fmt: skip
    return model, teacher


def make_rollout(
    cfg: Config, student: torch.nn.Module, tokenizer, *, model_path: str, sharded: bool
) -> Rollout:
    """The sampler. ``model_path`` is the folder the student was loaded from (on resume, the
    checkpoint): a vLLM engine loads its first weights from it, so engine and trainer start
    equal. ``sharded`` is true under FSDP2 (generation must step all ranks together); a vLLM
    engine is per process and needs no such care, but every rank builds it at the same time."""
    r = cfg.rollout
    if r.backend == "vllm":
        from kdrl.rollout_vllm import VLLMRollout

        max_len = r.vllm.max_model_len
        if not max_len:  # the longest sequence the data allows, within the model's positions
            max_len = cfg.data.max_prompt_tokens + r.max_new_tokens
            positions = getattr(student.config, "max_position_embeddings", None)
            max_len = min(max_len, positions) if positions else max_len
        return VLLMRollout(
            model_path, tokenizer, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, dtype=next(student.parameters()).dtype,
            max_model_len=max_len, seed=cfg.seed,
            gpu_memory_utilization=r.vllm.gpu_memory_utilization,
            kv_cache_gb=r.vllm.cpu_kvcache_gb if not torch.cuda.is_available() else None,
            enforce_eager=r.vllm.enforce_eager,
        )  # fmt: skip
    return HFRollout(
        student, tokenizer, temperature=r.temperature, top_p=r.top_p,
        max_new_tokens=r.max_new_tokens, synced=sharded,
    )  # fmt: skip
