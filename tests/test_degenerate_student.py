"""A student that only ever babbles digits, trained and evaluated for real: the training guard
warns about it, the end of training and the report say it did not learn and degenerated, and a
healthy student beside it draws no warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdrl.config import load_config
from kdrl.metrics import read_metrics
from kdrl.report import summary_table, write_report
from kdrl.tiny import char_tokenizer, fit_tiny, save_tiny, tiny_causal_lm
from kdrl.train import train

STEPS = 4


def digit_babbler(tok, *, digit: str = "7"):
    """A tiny Llama that answers anything with digits, mostly ``digit``, and never ends.

    Its decoder layers add nothing (zero output projections) and every token embeds to the same
    vector, so the last hidden state is the same at every position, and the output rows alone
    set the next-token logits: 8 for each digit, 12.8 for ``digit``, -12.8 for EOS, 0 else."""
    model = tiny_causal_lm(tok, hidden=32, layers=2, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)  # normalised: all ones
        head = model.lm_head.weight
        head.zero_()
        head[tok.convert_tokens_to_ids(list("0123456789"))] = 8.0 / 32
        head[tok.convert_tokens_to_ids(digit)] = 12.8 / 32
        head[tok.eos_token_id] = -12.8 / 32
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A tiny adder as teacher ("1+2=" -> "3", EOS), the babbler, a healthy student (a copy of
    the teacher) and the prompts."""
    root = tmp_path_factory.mktemp("degenerate")
    tok = char_tokenizer()
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    teacher = tiny_causal_lm(tok, hidden=32, layers=2, seed=4)
    fit_tiny(teacher, tok, [r["prompt"] + r["answer"] for r in rows], steps=120, lr=1e-2)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "teacher": save_tiny(root / "teacher", tok, teacher),
        "babbler": save_tiny(root / "babbler", tok, digit_babbler(tok)),
        "healthy": save_tiny(root / "healthy", tok, teacher),
        "prompts": root / "prompts.jsonl",
    }


def run(setup, student: str, out: Path) -> list[dict]:
    prompts = setup["prompts"]
    cfg = load_config(None, [
        f"student.path={setup[student]}", f"teacher.path={setup['teacher']}",
        f"data.path={prompts}", "data.answer_field=answer", "data.chat_template=false",
        "reward.fn=exact_match", "teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1",
        "rollout.n_samples=2", "rollout.max_new_tokens=8", "train.batch_size=2",
        f"train.max_steps={STEPS}", "optim.lr=1e-5", "train.tensorboard=false",
        f"train.output_dir={out}", f"eval.path={prompts}", "eval.split=train",
        "eval.max_prompts=8", "eval.temperature=1.0", "train.guard_patience_steps=2",
    ])  # fmt: skip
    train(cfg)
    return read_metrics(out / "metrics.jsonl")


def guard_warnings(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records
                if r.name == "kdrl" and r.levelno == logging.WARNING]  # fmt: skip
    return [m for m in messages if "sampled answers" in m]


def test_the_guard_warns_about_a_degenerate_student(setup, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdrl")
    records = run(setup, "babbler", tmp_path / "run")
    trained = [r for r in records if r["step"] > 0]
    assert [r["rollout/eos_frac"] for r in trained] == [0.0] * STEPS
    assert all(r["rollout/repeat_frac"] > 0.5 and r["rollout/distinct_frac"] < 0.5 for r in trained)
    assert all(r["rollout/eos_frac"] + r["rollout/truncated_frac"] == 1.0 for r in trained)
    warnings = guard_warnings(caplog)
    # Both limits crossed from step 2 on (2 steps of patience): each said once, at step 2.
    assert len(warnings) == 2, warnings
    (eos,) = [w for w in warnings if "not ending" in w]
    (loop,) = [w for w in warnings if "looping" in w]
    assert eos.startswith("step 2: sampled answers are not ending: 0 of 8 over the last 2 steps")
    assert "(the teacher's held-out answers: 100%)" in eos
    assert loop.startswith("step 2: sampled answers are looping")
    # The end of training and the report give the same verdict, in the same words.
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict: ")]
    assert said.startswith("verdict: The student did not learn: ")
    assert "its answers are degenerate (0% end within the 8-token limit against 100% of " in said
    text = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert f"## Verdict\n\n{said.removeprefix('verdict: ')}\n" in text
    assert "Verdict: The student did not learn" in summary_table(tmp_path / "run")


def test_a_healthy_student_draws_no_warning(setup, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdrl")
    records = run(setup, "healthy", tmp_path / "run")
    trained = [r for r in records if r["step"] > 0]
    # The guard was given every chance: answers measured each step, a full window from step 2.
    assert len(trained) == STEPS and all(r["rollout/eos_frac"] >= 0.75 for r in trained)
    assert guard_warnings(caplog) == []
    text = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "## Verdict" in text and "answers are degenerate" not in text
