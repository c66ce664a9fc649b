"""Loading the student, its tokenizer and the frozen teacher from Hugging Face folders or names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("kdrl")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(device: torch.device) -> bool:
    """bfloat16 matmuls run natively: a CUDA GPU that supports them, or a CPU with
    avx512_bf16 or AMX whose AVX-512 kernels torch uses. Elsewhere (e.g. AVX2-only CPUs) bf16 is
    emulated, ~9x slower than float32 on this project's machine. ``ATEN_CPU_CAPABILITY=avx2``
    on an AVX-512 CPU restricts torch to its AVX2 kernels, and some of its bf16 kernels then
    fail ("pack_vnni2 is only supported when avx512 is supported"): not native either."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_dtype(name: str, device: torch.device, key: str) -> torch.dtype:
    """``auto`` is bfloat16 where it is native (`fast_bf16`), float32 otherwise."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cpu" and not fast_bf16(device):
        log.warning(
            "%s is bfloat16 but this CPU has no native bf16 (avx512_bf16/AMX): bf16 matmuls are "
            "emulated and much slower than float32; %s=auto picks float32 here",
            key,
            key,
        )
    return dtype


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``auto`` is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"train.device: {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available here")
    return device


def _missing_local_path(name_or_path: str) -> bool:
    # A hub name has at most one slash and does not start like a path; anything else that is
    # not on disk is a typo that from_pretrained would report as a confusing hub error.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    return looks_local and not Path(name_or_path).expanduser().exists()


def _check_path(name_or_path: str, key: str) -> None:
    if not name_or_path:
        raise ValueError(f"{key} is empty: give a Hugging Face model folder or hub name")
    if _missing_local_path(name_or_path):
        raise ValueError(f"{key}: model folder {name_or_path!r} does not exist")
    folder = Path(name_or_path).expanduser()
    if folder.exists() and not (folder / "config.json").is_file():
        # from_pretrained would fail on the tokenizer or the weights with a message that names
        # neither the folder nor the key (e.g. "install sentencepiece").
        raise ValueError(
            f"{key}: {name_or_path!r} is not a Hugging Face model folder (it has no "
            "config.json); give the folder that `save_pretrained` wrote, or a hub name"
        )


def _pretrained(load: Callable[..., Any], name_or_path: str, key: str, what: str, **kwargs):
    """``load(name_or_path)``, with a hub or file error turned into one line naming the key."""
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        # Hub errors (not found, offline, gated) are OSErrors of several lines; the first says
        # what went wrong.
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ValueError(
            f"{key}: cannot load the {what} of {name_or_path!r}: {reason or type(err).__name__}"
        ) from err


def load_tokenizer(name_or_path: str, *, key: str = "student.path"):
    """The student's tokenizer; the teacher scores the student's token ids with it."""
    _check_path(name_or_path, key)
    tok = _pretrained(AutoTokenizer.from_pretrained, name_or_path, key, "tokenizer")
    if tok.eos_token_id is None:
        raise ValueError(f"{key}: tokenizer of {name_or_path!r} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only used to fill rectangles; masks decide validity
    return tok


def load_student(
    name_or_path: str, *, dtype: str, gradient_checkpointing: bool, device: str = "cpu"
) -> PreTrainedModel:
    """The trainable student, in train mode with dropout as its config says."""
    _check_path(name_or_path, "student.path")
    target = resolve_device(device)
    model = _pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_path, "student.path", "model",
        dtype=resolve_dtype(dtype, target, "student.dtype"),
    )  # fmt: skip
    model.to(target)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    return model


def load_teacher(name_or_path: str, *, dtype: str, device: str = "cpu") -> PreTrainedModel:
    """The frozen teacher: eval mode (no dropout), no parameter requires a gradient."""
    _check_path(name_or_path, "teacher.path")
    target = resolve_device(device)
    model = _pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_path, "teacher.path", "model",
        dtype=resolve_dtype(dtype, target, "teacher.dtype"),
    )  # fmt: skip
    model.to(target)
    model.eval()
    model.requires_grad_(False)
    return model


def support_size(model: PreTrainedModel, tokenizer) -> int:
    """The token ids every distribution in kdrl is normalised over: the tokenizer's ids, never
    the padded embedding rows past them (Qwen pads 151,665 ids to 151,936 rows). The sampler
    masks those rows, so the trainer, the teacher and evaluation must cut them too, or the policy
    being trained is not the one that sampled."""
    rows = model.get_output_embeddings().weight.shape[0]
    return min(len(tokenizer), rows)
