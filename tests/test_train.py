"""The training loop end to end on real tiny Hugging Face models (built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.config import load_config
from kdrl.metrics import read_metrics
from kdrl.prune import prune_decoder_layers
from kdrl.tiny import char_tokenizer, fit_tiny, save_tiny, tiny_causal_lm
from kdrl.train import train

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(tiny_pair, prompts_file, out: Path, *extra: str) -> list[str]:
    student, teacher = tiny_pair
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts_file}",
        "data.answer_field=answer", "reward.fn=exact_match", "data.chat_template=false",
        f"train.output_dir={out}", "train.batch_size=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=8", "optim.lr=1e-3", "train.tensorboard=false", *extra,
    ]  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_three_steps_are_finite_move_the_weights_and_save_a_loadable_model(
    tiny_pair, prompts_file, tmp_path
):
    cfg = load_config(None, base(tiny_pair, prompts_file, tmp_path / "run", "train.max_steps=3"))
    final = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss/total", "loss/grpo", "loss/kd", "rollout/reverse_kl", "optim/grad_norm"):
            assert key in r and torch.isfinite(torch.tensor(r[key])), key
    before, after = weights(tiny_pair[0]), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tok("1+2=", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4
    assert (tmp_path / "run" / "config.yaml").exists()


def test_resume_is_bit_identical(tiny_pair, prompts_file, tmp_path):
    common = ("train.save_every_steps=2", "optim.warmup_steps=3", "teacher.distill_loss_weight=0.5")
    straight = train(load_config(None, base(tiny_pair, prompts_file, tmp_path / "a",
                                            "train.max_steps=4", *common)))  # fmt: skip
    train(
        load_config(
            None, base(tiny_pair, prompts_file, tmp_path / "b", "train.max_steps=2", *common)
        )
    )
    resumed = train(
        load_config(
            None, base(tiny_pair, prompts_file, tmp_path / "b", "train.max_steps=4", *common)
        ),
        resume=True,
    )
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = read_metrics(tmp_path / "a" / "metrics.jsonl")
    mb = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss/total"] == rb["loss/total"] and ra["reward/mean"] == rb["reward/mean"]


def test_pure_kd_ignores_everything_grpo(tiny_pair, prompts_file, tmp_path):
    # rl_loss_weight 0: the GRPO settings and the reward function cannot change the update.
    kd = ("teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1", "train.max_steps=2")
    a = train(load_config(None, base(tiny_pair, prompts_file, tmp_path / "a", *kd)))
    b = train(load_config(None, base(tiny_pair, prompts_file, tmp_path / "b", *kd,
                                     "reward.fn=none", "grpo.eps_clip=0.01",
                                     "grpo.reward_scaling=7")))  # fmt: skip
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert "loss/grpo" not in rows[0] and rows[0]["loss/total"] == rows[0]["loss/kd"]


def test_resume_refuses_a_different_config(tiny_pair, prompts_file, tmp_path):
    train(load_config(None, base(tiny_pair, prompts_file, tmp_path / "r", "train.max_steps=1")))
    changed = load_config(None, base(tiny_pair, prompts_file, tmp_path / "r", "optim.lr=0.5"))
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 -> 0.5"):
        train(changed, resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        train(load_config(None, base(tiny_pair, prompts_file, tmp_path / "r", "train.max_steps=1")))


def test_distillation_recovers_a_pruned_student(prompts_file, tmp_path):
    # A teacher that has learned the task, and a student made by dropping half its layers:
    # distillation must pull the student's reverse KL to the teacher down clearly.
    tok = char_tokenizer()
    teacher_model = tiny_causal_lm(tok, hidden=32, layers=4, seed=4)
    texts = [f"{a}+{b}={a + b}" for a in range(1, 9) for b in range(3)]
    assert fit_tiny(teacher_model, tok, texts, steps=100, lr=1e-2)[-1] < 1.0
    teacher = save_tiny(tmp_path / "t", tok, teacher_model)
    student = save_tiny(tmp_path / "s", tok, prune_decoder_layers(teacher_model, [0, 3]))
    cfg = load_config(None, base((student, teacher), prompts_file, tmp_path / "run",
        "teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1", "reward.fn=none",
        "train.max_steps=30", "train.epochs=10", "optim.lr=1e-3", "train.batch_size=4",
        "rollout.n_samples=4", f"eval.path={prompts_file}", "eval.split=train",
        "eval.max_prompts=8", "eval.temperature=1.0",
    ))  # fmt: skip
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0]["eval/reverse_kl"], rows[-1]["eval/reverse_kl"]
    assert last < 0.5 * first, (first, last)


def test_cli_train_then_eval(tiny_pair, prompts_file, tmp_path, capsys):
    from kdrl.cli import main

    args = base(tiny_pair, prompts_file, tmp_path / "run", "train.max_steps=1")
    assert main(["train", *args]) == 0
    final = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert f"final model: {final}" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(final), "--output", str(out),
                 *args, f"eval.path={prompts_file}", "eval.max_prompts=3"])  # fmt: skip
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["eval/prompts"] == 3 and metrics["eval/reverse_kl"] >= 0
    assert 0 <= metrics["eval/accuracy"] <= 1
    # The measures a degenerate student cannot fake, printed as well as written, then the
    # first answers side by side, and every answer in a file beside the metrics.
    stdout = capsys.readouterr().out
    text, _, answers = stdout.partition("\n\n[")
    printed = json.loads(text)
    assert printed == metrics
    lines = out.with_suffix(".answers.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 3
    assert {"prompt", "student", "teacher", "reference", "reward"} <= set(rows[0])
    first = f"[{rows[0]['index']}] {rows[0]['prompt']}\n  student:   {rows[0]['student']!r}\n"
    assert answers.startswith(first[1:]), stdout
    assert f"  reference: {rows[0]['reference']!r}" in answers
    assert answers.count("\n\n[") == 2  # 3 answers printed by default
    new = ["reverse_kl_seq", "teacher_nll", "accuracy_greedy", "agreement_greedy", "eos_frac",
           "repeat_frac", "distinct_frac", "teacher_eos_frac", "teacher_repeat_frac",
           "teacher_distinct_frac"]  # fmt: skip
    new = [f"eval/{key}" for key in new]
    assert set(new) <= set(printed), sorted(set(new) - set(printed))
    assert (
        printed["eval/teacher_nll"] > 0
        and printed["eval/reverse_kl_seq"] >= printed["eval/reverse_kl"]
    )


def test_cli_reports_bad_input_in_one_line(tiny_pair, prompts_file, tmp_path, capsys):
    from kdrl.cli import main

    args = base(tiny_pair, prompts_file, tmp_path / "run", "student.path=/no/such/model")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "kdrl: error: student.path: model folder '/no/such/model' does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_distillation_weight_follows_its_schedule(tiny_pair, prompts_file, tmp_path):
    schedule = (
        "teacher.distill_loss_weight=0.5", "teacher.distill_loss_weight_final=0.1",
        "teacher.distill_decay_steps=2", "teacher.kd_correct_weight=0", "train.max_steps=3",
    )  # fmt: skip
    cfg = load_config(None, base(tiny_pair, prompts_file, tmp_path / "run", *schedule))
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kd/weight"] for r in rows] == pytest.approx([0.5, 0.3, 0.1])


def test_padded_vocabulary_rows_never_enter_the_trained_policy(prompts_file, tmp_path):
    """Qwen-style padded output rows (ids past the tokenizer) are masked by the sampler; the
    trainer must normalise over the same ids, or it trains another policy than the one that
    sampled. Dominant padded rows make any mismatch huge (~100 nats a token)."""
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=32, layers=2, vocab_rows=len(tok) + 5, seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tok) :] *= 1000
    student = save_tiny(tmp_path / "padded", tok, model)
    teacher = save_tiny(tmp_path / "teacher", tok, tiny_causal_lm(tok, hidden=32, layers=2, seed=4))
    cfg = load_config(None, [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts_file}",
        "data.chat_template=false", "teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1",
        "train.batch_size=2", "rollout.n_samples=2", "rollout.max_new_tokens=8",
        "optim.lr=1e-2", "train.max_steps=3", "train.tensorboard=false",
        f"train.output_dir={tmp_path / 'run'}", f"eval.path={prompts_file}", "eval.max_prompts=2",
    ])  # fmt: skip
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    gaps = [r["actor/behav_logprob_gap"] for r in rows if "actor/behav_logprob_gap" in r]
    assert len(gaps) == 3 and max(gaps) < 1e-4, gaps
    assert all(r["eval/reverse_kl"] < 50 for r in rows if "eval/reverse_kl" in r), rows
