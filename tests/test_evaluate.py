"""Held-out evaluation: the exact per-answer reverse KL and the teacher-forced NLL and top-1
agreement against toy models whose next-token distributions are known in closed form, and the
greedy pass of `evaluate` on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch

from kdrl.data import Prompt
from kdrl.evaluate import evaluate, exact_reverse_kl_per_answer, teacher_forced, teacher_reference
from kdrl.rewards import get_reward_fn
from kdrl.tiny import char_tokenizer, fit_tiny, tiny_causal_lm
from loopback import batch_of

V = 7


class Shift(torch.nn.Module):
    """``p(next = (x + 1) mod V | x) = hit``, the rest spread evenly over the other ids."""

    device = torch.device("cpu")

    def __init__(self, hit: float) -> None:
        super().__init__()
        self.hit = hit

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = torch.full((*input_ids.shape, V), math.log((1 - self.hit) / (V - 1)))
        logits.scatter_(-1, ((input_ids + 1) % V)[..., None], math.log(self.hit))
        return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()


def shift_logprob(hit: float, prev: int, tok: int, temperature: float) -> float:
    logits = torch.full((V,), math.log((1 - hit) / (V - 1)), dtype=torch.float64)
    logits[(prev + 1) % V] = math.log(hit)
    return torch.log_softmax(logits / temperature, -1)[tok].item()


# Responses of 1, 3 and 4 tokens after prompts of different lengths; pad 6.
ROWS = [([1, 2, 3], [4]), ([0, 1, 2, 3, 4, 5], [6, 0, 3]), ([2, 2], [3, 4, 1, 2])]


@pytest.mark.parametrize("max_tokens", [1, 7, 1000])
def test_reverse_kl_per_answer_is_the_closed_form_times_the_length(max_tokens):
    # At temperature 1 every position has the same KL(q || p) between two shift models.
    a, b = 0.6, 0.9
    per_position = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    sums = exact_reverse_kl_per_answer(
        Shift(a), Shift(b), batch_of(ROWS, pad=6), student_temperature=1.0,
        teacher_temperature=1.0, max_tokens_per_mb=max_tokens, vocab=V,
    )  # fmt: skip
    assert sums == pytest.approx([1 * per_position, 3 * per_position, 4 * per_position], rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("max_tokens", [1, 1000])
def test_teacher_forced_nll_and_top1_are_exact(temperature, max_tokens):
    hit = 0.6
    forced = teacher_forced(Shift(hit), batch_of(ROWS, pad=6), temperature=temperature,
                            max_tokens_per_mb=max_tokens, vocab=V)  # fmt: skip
    # (token before, answer token) at every answer position.
    pairs = [pair for p, r in ROWS for pair in zip((p + r)[len(p) - 1 : -1], r, strict=True)]
    assert forced.tokens == len(pairs) == 8
    # The student's top token is prev + 1: 3 after 2, 4 after 3, 2 after 1, and so on.
    assert forced.top1_hits == sum(tok == (prev + 1) % V for prev, tok in pairs) == 6
    want = -sum(shift_logprob(hit, prev, tok, temperature) for prev, tok in pairs)
    assert forced.nll == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def models(one_thread):
    """(student, teacher, tokenizer): a tiny adder as teacher (answers "1+2=" with "3" and EOS)
    and a less trained copy as student, so that accuracy and agreement are neither 0 nor 1."""
    tok = char_tokenizer()
    texts = [f"{a}+{b}={a + b}" for a in range(1, 9) for b in range(3)]
    teacher = tiny_causal_lm(tok, hidden=32, layers=2, seed=4)
    fit_tiny(teacher, tok, texts, steps=120, lr=1e-2)
    student = tiny_causal_lm(tok, hidden=32, layers=2, seed=4)
    fit_tiny(student, tok, texts, steps=40, lr=1e-2)
    return student, teacher, tok


def held_out(tok) -> list[Prompt]:
    texts = {f"{a}+{b}=": str(a + b) for a in range(1, 9) for b in (0, 2)}
    return [
        Prompt(index=i, text=t, ids=tok(t, add_special_tokens=False)["input_ids"], answer=a,
               truncated=False)
        for i, (t, a) in enumerate(texts.items())
    ]  # fmt: skip


def run_evaluate(models, *, temperature: float, greedy: bool):
    student, teacher, tok = models
    prompts = held_out(tok)
    limits = dict(max_new_tokens=6, reward_fn=get_reward_fn("exact_match"), correct_threshold=1.0)
    reference, teacher_metrics = teacher_reference(teacher, tok, prompts, **limits)
    metrics, answers = evaluate(
        student, tok, prompts, teacher=teacher, reference=reference, temperature=temperature,
        greedy=greedy, student_temperature=1.0, teacher_temperature=1.0, max_tokens_per_mb=64,
        seed=3, **limits,
    )  # fmt: skip
    return metrics, answers, reference, teacher_metrics


def test_evaluate_metrics_agree_with_the_answers(models):
    metrics, answers, reference, teacher_metrics = run_evaluate(models, temperature=1.0,
                                                                greedy=True)  # fmt: skip
    eos, n = models[2].eos_token_id, len(answers.texts)
    ids = answers.token_ids()
    assert metrics["eval/len_mean"] == sum(map(len, ids)) / n
    assert metrics["eval/eos_frac"] == sum(a[-1] == eos for a in ids) / n
    assert metrics["eval/eos_frac"] + metrics["eval/truncated_frac"] == 1.0
    tokens = sum(map(len, ids))
    assert metrics["eval/reverse_kl_seq"] == pytest.approx(metrics["eval/reverse_kl"] * tokens / n)
    assert metrics["eval/teacher_nll"] > 0 and 0 < metrics["eval/top1_agreement"] < 1
    teacher_ids = reference.token_ids()
    assert teacher_metrics["eval/teacher_len_mean"] == sum(map(len, teacher_ids)) / n
    assert teacher_metrics["eval/teacher_eos_frac"] == sum(a[-1] == eos for a in teacher_ids) / n
    assert teacher_metrics["eval/teacher_eos_frac"] == 1.0  # the adder ends every answer
    for key in ("repeat_frac", "distinct_frac"):
        assert 0 <= metrics[f"eval/{key}"] <= 1 and 0 <= teacher_metrics[f"eval/teacher_{key}"] <= 1


def test_greedy_pass_matches_a_greedy_evaluation_and_can_be_turned_off(models):
    greedy, greedy_answers, *_ = run_evaluate(models, temperature=0.0, greedy=False)
    sampled, sampled_answers, *_ = run_evaluate(models, temperature=1.0, greedy=True)
    without, *_ = run_evaluate(models, temperature=1.0, greedy=False)
    # At temperature 0 the answers are greedy already: their metrics are the greedy ones.
    assert greedy["eval/accuracy_greedy"] == greedy["eval/accuracy"]
    assert greedy["eval/agreement_greedy"] == greedy["eval/agreement"]
    # The sampled evaluation's extra greedy pass gives exactly what a greedy evaluation gives.
    assert sampled["eval/accuracy_greedy"] == greedy["eval/accuracy"]
    assert sampled["eval/agreement_greedy"] == greedy["eval/agreement"]
    assert 0 < greedy["eval/accuracy"] < 1 and 0 < greedy["eval/agreement"] < 1
    assert sampled["eval/accuracy"] != greedy["eval/accuracy"]  # sampled answers differ
    assert sampled_answers.texts != greedy_answers.texts
    assert not any(k.endswith("_greedy") for k in without)
    assert {k: v for k, v in sampled.items() if not k.endswith("_greedy")} == without
