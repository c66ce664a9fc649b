"""Held-out evaluation: accuracy under the task reward, agreement with the teacher's own greedy
answers, and the exact per-token reverse KL to the teacher on the student's answers.

The reverse KL here is not a one-token estimate: at every position of the student's answer it
sums ``q log(q / p)`` over the whole vocabulary (student at its rollout temperature, teacher at
``teacher.temperature``), then averages over answer tokens. Prompts are evaluated in chunks of
``EVAL_CHUNK`` so memory stays bounded on large held-out sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from kdrl import stop
from kdrl.data import Prompt
from kdrl.distributed import is_sharded
from kdrl.divergences import full_divergence_loss
from kdrl.forward import response_window, window_logits
from kdrl.microbatch import token_budget_microbatches
from kdrl.models import support_size
from kdrl.rewards import RewardFn, compute_rewards
from kdrl.rollout import HFRollout, RolloutBatch, sequence_seed

if TYPE_CHECKING:
    from kdrl.train import Run

EVAL_CHUNK = 16


@dataclass
class Answers:
    """One answer per prompt, in prompt order, with its reward when there is a reward."""

    prompts: list[Prompt]
    texts: list[str]
    rewards: list[float] | None
    batches: list[RolloutBatch] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """JSON-ready rows for ``samples/*.jsonl``."""
        return [
            {"index": p.index, "prompt": p.user or p.text, "reference": p.answer,
             "response": text, "reward": None if self.rewards is None else self.rewards[i]}
            for i, (p, text) in enumerate(zip(self.prompts, self.texts, strict=True))
        ]  # fmt: skip


def answer(
    model, tokenizer, prompts, *, temperature, max_new_tokens, reward_fn, seed=0, synced=False
) -> Answers:
    """Answers of ``model`` (greedy at ``temperature == 0``), each sampled from its own seeded
    generator: evaluations at different steps share their random numbers, every data-parallel
    rank gets the same answers, and the training run's RNG is left alone."""
    rollout = HFRollout(
        model, tokenizer, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
        synced=synced,
    )  # fmt: skip
    batches = []
    with torch.random.fork_rng():
        for s in range(0, len(prompts), EVAL_CHUNK):
            chunk = prompts[s : s + EVAL_CHUNK]
            batches.append(rollout.generate(chunk, n_samples=1, seed=seed))
    texts = [t for b in batches for t in b.response_texts]
    rewards = None
    if reward_fn is not None:
        rewards = compute_rewards(
            reward_fn, texts, [p.answer for p in prompts], [p.index for p in prompts],
            sources=[p.where for p in prompts],
        )  # fmt: skip
    return Answers(prompts, texts, rewards, batches)


@torch.no_grad()
def exact_reverse_kl_sum(student, teacher, batch: RolloutBatch, *, student_temperature: float,
                         teacher_temperature: float, max_tokens_per_mb: int,
                         vocab: int) -> float:  # fmt: skip
    """Sum over response tokens of ``KL(q(.|h_t) || p(.|h_t))`` over the whole vocabulary (the
    first ``vocab`` ids, see `kdrl.models.support_size`)."""
    lengths = batch.attention_mask_BT.sum(1).tolist()
    total = 0.0
    for rows in token_budget_microbatches(lengths, max_tokens_per_mb):
        stop.abandon_point()  # a stop request during training skips the evaluation
        window = response_window(batch, rows)
        student_logits = window_logits(student, batch, window)[..., :vocab]
        teacher_logits = window_logits(teacher, batch, window)[..., :vocab].to(student.device)
        total += full_divergence_loss(
            student_logits, teacher_logits,
            window.take(batch.response_mask_BT, student_logits.device), kind="reverse_kl",
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            num_tokens=1.0,
        ).item()  # fmt: skip
    return total


@torch.no_grad()
def top1_matches(
    student, batch: RolloutBatch, *, max_tokens_per_mb: int, vocab: int | None = None
) -> tuple[int, int]:
    """(positions where the student's most likely next token is the one in ``batch``, positions):
    teacher-forced agreement with another model's answers."""
    lengths = batch.attention_mask_BT.sum(1).tolist()
    hits = 0
    for rows in token_budget_microbatches(lengths, max_tokens_per_mb):
        stop.abandon_point()
        window = response_window(batch, rows)
        guess = window_logits(student, batch, window)[..., :vocab].argmax(-1).cpu()
        same = guess == window.take(batch.input_ids_BT)
        hits += int((same & window.take(batch.response_mask_BT)).sum())
    return hits, int(batch.response_mask_BT.sum())


def evaluate(
    student: PreTrainedModel,
    tokenizer,
    prompts: list[Prompt],
    *,
    teacher: PreTrainedModel | None,
    reference: Answers | None,
    reward_fn: RewardFn | None,
    correct_threshold: float,
    temperature: float,
    student_temperature: float,
    teacher_temperature: float,
    max_new_tokens: int,
    max_tokens_per_mb: int,
    seed: int = 0,
    synced: bool = False,
) -> tuple[dict[str, float], Answers]:
    """The student's answers and ``eval/`` metrics; ``reference`` holds the teacher's greedy
    answers on the same prompts (for agreement), when there is a teacher."""
    was_training = student.training
    vocab = support_size(student, tokenizer)
    student.eval()
    try:
        ans = answer(student, tokenizer, prompts, temperature=temperature,
                     max_new_tokens=max_new_tokens, reward_fn=reward_fn, seed=seed,
                     synced=synced)  # fmt: skip
        lengths = torch.cat([b.response_len_B for b in ans.batches]).float()
        truncated = torch.cat([b.truncated_B for b in ans.batches]).float()
        metrics = {
            "eval/len_mean": lengths.mean().item(),
            "eval/truncated_frac": truncated.mean().item(),
        }
        if ans.rewards is not None:
            metrics["eval/reward"] = sum(ans.rewards) / len(ans.rewards)
            hits = sum(r >= correct_threshold for r in ans.rewards)
            metrics["eval/accuracy"] = hits / len(ans.rewards)
        if teacher is not None:
            kl = sum(exact_reverse_kl_sum(
                student, teacher, b, student_temperature=student_temperature,
                teacher_temperature=teacher_temperature, max_tokens_per_mb=max_tokens_per_mb,
                vocab=vocab,
            ) for b in ans.batches)  # fmt: skip
            metrics["eval/reverse_kl"] = kl / max(lengths.sum().item(), 1.0)
        if reference is not None:
            same = [a.strip() == b.strip() for a, b in zip(ans.texts, reference.texts, strict=True)]
            metrics["eval/agreement"] = sum(same) / len(same)
            counts = [top1_matches(student, b, max_tokens_per_mb=max_tokens_per_mb, vocab=vocab)
                      for b in reference.batches]  # fmt: skip
            metrics["eval/top1_agreement"] = sum(h for h, _ in counts) / max(
                sum(n for _, n in counts), 1
            )
    finally:
        student.train(was_training)
    return metrics, ans


def teacher_reference(teacher, tokenizer, prompts, *, max_new_tokens, reward_fn, correct_threshold):
    """The teacher's greedy answers (the reference for agreement) and its own accuracy."""
    ref = answer(teacher, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens,
                 reward_fn=reward_fn)  # fmt: skip
    metrics = {}
    if ref.rewards is not None:
        metrics["eval/teacher_accuracy"] = sum(r >= correct_threshold for r in ref.rewards) / len(
            ref.rewards
        )
    return ref, metrics


def evaluate_model(cfg, model: str) -> dict[str, float]:
    """`kdrl eval`: load ``model`` as the student and the configured teacher, evaluate on
    ``eval.path`` (all of it unless ``eval.max_prompts``)."""
    from kdrl.data import load_prompts
    from kdrl.models import load_student, load_teacher, load_tokenizer
    from kdrl.rewards import get_reward_fn

    if not cfg.eval.path:
        raise ValueError("eval.path is empty: give the held-out prompts to evaluate on")
    tokenizer = load_tokenizer(model, key="--model")
    device = cfg.train.device
    student = load_student(
        model, dtype=cfg.student.dtype, gradient_checkpointing=False, device=device
    )
    teacher = None
    if cfg.teacher.path and cfg.teacher.backend == "local":  # a served teacher has no logits here
        teacher = load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        path=cfg.eval.path,
        split=cfg.eval.split,
        limit=cfg.eval.max_prompts,
        key="eval.path",
    ).prompts
    reward_fn = get_reward_fn(cfg.reward.fn)
    limits = dict(max_new_tokens=cfg.rollout.max_new_tokens, reward_fn=reward_fn,
                  correct_threshold=cfg.reward.correct_threshold)  # fmt: skip
    reference, teacher_metrics = (None, {})
    if teacher is not None:
        reference, teacher_metrics = teacher_reference(teacher, tokenizer, prompts, **limits)
    metrics, _ = evaluate(
        student, tokenizer, prompts, teacher=teacher, reference=reference,
        temperature=cfg.eval.temperature, student_temperature=cfg.rollout.temperature,
        teacher_temperature=cfg.teacher.temperature,
        max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb, **limits,
    )  # fmt: skip
    return {"eval/prompts": float(len(prompts)), **metrics, **teacher_metrics}


def run_eval(run: Run) -> dict[str, float]:
    """The training loop's evaluation on the held-out prompts of ``run``; answers go to
    ``samples/step-%08d.jsonl``. The first call also records the teacher's greedy answers
    (``samples/teacher.jsonl``)."""
    if not run.eval_prompts:
        return {}
    cfg = run.cfg
    limits = dict(max_new_tokens=cfg.rollout.max_new_tokens, reward_fn=run.reward_fn,
                  correct_threshold=cfg.reward.correct_threshold)  # fmt: skip
    extra: dict[str, float] = {}
    if run.teacher_model is not None and run.eval_reference is None:
        run.eval_reference, extra = teacher_reference(
            run.teacher_model, run.tokenizer, run.eval_prompts, **limits
        )
        if run.ctx.is_main:
            _write_rows(run.output_dir / "samples" / "teacher.jsonl", run.eval_reference.rows())
    # Every rank evaluates the same prompts with the same seed (a sharded student needs all
    # ranks in each forward pass); rank 0 writes.
    metrics, answers = evaluate(
        run.model, run.tokenizer, run.eval_prompts, teacher=run.teacher_model,
        reference=run.eval_reference, temperature=cfg.eval.temperature,
        student_temperature=cfg.rollout.temperature, teacher_temperature=cfg.teacher.temperature,
        max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb, **limits,
        seed=sequence_seed(cfg.seed, -1, -1), synced=is_sharded(run.student),
    )  # fmt: skip
    if run.ctx.is_main:
        _write_rows(run.output_dir / "samples" / f"step-{run.step:08d}.jsonl", answers.rows())
    return metrics | extra


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
