"""Loading the student, its tokenizer and the frozen teacher from Hugging Face folders or names."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_tokenizer(name_or_path: str, *, key: str = "student.path"):
    """The student's tokenizer; the teacher scores the student's token ids with it."""
    _check_path(name_or_path, key)
    tok = AutoTokenizer.from_pretrained(name_or_path)
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
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    model.to(resolve_device(device))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    return model


def load_teacher(name_or_path: str, *, dtype: str, device: str = "cpu") -> PreTrainedModel:
    """The frozen teacher: eval mode (no dropout), no parameter requires a gradient."""
    _check_path(name_or_path, "teacher.path")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    model.to(resolve_device(device))
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
