"""Held-out evaluation: accuracy under the task reward and the exact per-token reverse KL to the
teacher on the student's own answers.

The reverse KL here is not a one-token estimate: at every position of the student's answer it
sums ``q log(q / p)`` over the whole vocabulary (student at its rollout temperature, teacher at
``teacher.temperature``), then averages over answer tokens.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kdrl.data import Prompt
from kdrl.divergences import full_divergence_loss
from kdrl.microbatch import token_budget_microbatches
from kdrl.rewards import RewardFn, compute_rewards
from kdrl.rollout import HFRollout, RolloutBatch


@torch.no_grad()
def exact_reverse_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batch: RolloutBatch,
    *,
    student_temperature: float,
    teacher_temperature: float,
    max_tokens_per_mb: int,
) -> float:
    """Mean over response tokens of ``KL(q(.|h_t) || p(.|h_t))``, summed over the vocabulary."""
    lengths = batch.attention_mask_BT.sum(1).tolist()
    total, count = 0.0, int(batch.response_mask_BT.sum())
    vocab = student.get_output_embeddings().weight.shape[0]
    for rows in token_budget_microbatches(lengths, max_tokens_per_mb):
        width = max(lengths[i] for i in rows)
        ids, attn = batch.input_ids_BT[rows, :width], batch.attention_mask_BT[rows, :width]
        s_logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1, :vocab]
        total += full_divergence_loss(
            s_logits, t_logits, batch.response_mask_BT[rows, 1:width], kind="reverse_kl",
            student_temperature=student_temperature, teacher_temperature=teacher_temperature,
            num_tokens=1.0,
        ).item()  # fmt: skip
    return total / max(count, 1)


def evaluate(
    student: PreTrainedModel,
    tokenizer,
    prompts: list[Prompt],
    *,
    teacher: PreTrainedModel | None,
    reward_fn: RewardFn | None,
    correct_threshold: float,
    temperature: float,
    student_temperature: float,
    teacher_temperature: float,
    max_new_tokens: int,
    max_tokens_per_mb: int,
) -> tuple[dict[str, float], RolloutBatch]:
    """One answer per prompt (greedy at ``temperature == 0``); metrics under ``eval/``.
    Sampling runs on a forked RNG so evaluating never changes the training run's samples."""
    was_training = student.training
    student.eval()
    rollout = HFRollout(
        student, tokenizer, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens
    )
    try:
        with torch.random.fork_rng():
            batch = rollout.generate(prompts, n_samples=1)
        metrics = _metrics(batch, prompts, reward_fn, correct_threshold)
        if teacher is not None:
            metrics["eval/reverse_kl"] = exact_reverse_kl(
                student, teacher, batch, student_temperature=student_temperature,
                teacher_temperature=teacher_temperature, max_tokens_per_mb=max_tokens_per_mb,
            )  # fmt: skip
    finally:
        student.train(was_training)
    return metrics, batch


def _metrics(batch: RolloutBatch, prompts, reward_fn, correct_threshold) -> dict[str, float]:
    metrics = {
        "eval/len_mean": batch.response_len_B.float().mean().item(),
        "eval/truncated_frac": batch.truncated_B.float().mean().item(),
    }
    if reward_fn is not None:
        rewards = compute_rewards(
            reward_fn, batch.response_texts, [p.answer for p in prompts], [p.index for p in prompts]
        )
        metrics["eval/reward"] = sum(rewards) / len(rewards)
        metrics["eval/accuracy"] = sum(r >= correct_threshold for r in rewards) / len(rewards)
    return metrics


def evaluate_model(cfg, model: str) -> dict[str, float]:
    """`kdrl eval`: load ``model`` as the student and the configured teacher, evaluate on
    ``eval.path`` (all of it unless ``eval.max_prompts``)."""
    from kdrl.data import load_prompts
    from kdrl.models import load_student, load_teacher, load_tokenizer
    from kdrl.rewards import get_reward_fn

    if not cfg.eval.path:
        raise ValueError("eval.path is empty: give the held-out prompts to evaluate on")
    tokenizer = load_tokenizer(model, key="--model")
    student = load_student(model, dtype=cfg.student.dtype, gradient_checkpointing=False)
    teacher = load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype) if cfg.teacher.path else None
    prompts = load_prompts(
        cfg.data, tokenizer, path=cfg.eval.path, split=cfg.eval.split, limit=cfg.eval.max_prompts
    ).prompts
    metrics, _ = evaluate(
        student, tokenizer, prompts, teacher=teacher, reward_fn=get_reward_fn(cfg.reward.fn),
        correct_threshold=cfg.reward.correct_threshold, temperature=cfg.eval.temperature,
        student_temperature=cfg.rollout.temperature, teacher_temperature=cfg.teacher.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb,
    )  # fmt: skip
    return {"eval/prompts": float(len(prompts)), **metrics}
