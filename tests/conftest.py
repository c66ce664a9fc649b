"""Shared fixtures: tiny models and tokenizers built offline (no hub access)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): random Llama models sharing a character-level tokenizer;
    the teacher is larger and its embedding is padded by 5 unused rows."""
    from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm

    root = tmp_path_factory.mktemp("tiny_pair")
    tok = char_tokenizer()
    student = save_tiny(root / "student", tok, tiny_causal_lm(tok, hidden=32, layers=2, seed=1))
    teacher_model = tiny_causal_lm(tok, hidden=48, layers=3, vocab_rows=len(tok) + 5, seed=2)
    teacher = save_tiny(root / "teacher", tok, teacher_model)
    return student, teacher


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module, restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
