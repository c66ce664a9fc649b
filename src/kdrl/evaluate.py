"""Held-out evaluation: how well the student does the task, how close it is to the teacher, and
whether its answers have degenerated.

- Task: accuracy under the task reward of the answers at ``eval.temperature`` and, with
  ``eval.greedy``, of greedy answers; exact agreement of those answers with the teacher's own
  greedy answers (meaningful for two greedy answers, much less for a sampled one).
- Teacher-forced on the teacher's greedy answers: how often the student's most likely next
  token is the teacher's (top-1 agreement), and the student's negative log-likelihood of them.
  A student that collapses into a degenerate mode cannot fake either.
- Reverse KL on the student's own answers, exact rather than a one-token estimate: at every
  position it sums ``q log(q / p)`` over the whole vocabulary (student at its rollout
  temperature, teacher at ``teacher.temperature``); per token, and per answer (summed over the
  answer's tokens, averaged over answers). Alone it can be fooled: it also falls when the student
  moves to a region the teacher finds likely once there, such as a string of digits.
- Degeneracy signals (`kdrl.degeneracy`) of the student's answers and of the teacher's.

Prompts are evaluated in chunks of ``EVAL_CHUNK`` so memory stays bounded on large held-out sets.
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
from kdrl.degeneracy import response_ids, signal_means
from kdrl.distributed import is_sharded
from kdrl.divergences import full_divergence_loss
from kdrl.forward import response_window, window_logits
from kdrl.logprobs import token_logprobs
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

    def token_ids(self) -> list[list[int]]:
        """Each answer's token ids, its final EOS included when it has one."""
        return [
            ids for b in self.batches for ids in response_ids(b.input_ids_BT, b.response_mask_BT)
        ]

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
def exact_reverse_kl_per_answer(student, teacher, batch: RolloutBatch, *,
                                student_temperature: float, teacher_temperature: float,
                                max_tokens_per_mb: int, vocab: int) -> list[float]:  # fmt: skip
    """For each sequence of ``batch``, the sum over its response tokens of ``KL(q(.|h_t) ||
    p(.|h_t))`` over the whole vocabulary (the first ``vocab`` ids, see
    `kdrl.models.support_size`)."""
    lengths = batch.attention_mask_BT.sum(1).tolist()
    sums = [0.0] * batch.num_sequences
    for rows in token_budget_microbatches(lengths, max_tokens_per_mb):
        stop.abandon_point()  # a stop request during training skips the evaluation
        window = response_window(batch, rows)
        student_logits = window_logits(student, batch, window)[..., :vocab]
        teacher_logits = window_logits(teacher, batch, window)[..., :vocab].to(student.device)
        mask = window.take(batch.response_mask_BT, student_logits.device)
        for i, row in enumerate(rows):
            sums[row] = full_divergence_loss(
                student_logits[i], teacher_logits[i], mask[i], kind="reverse_kl",
                student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                num_tokens=1.0,
            ).item()  # fmt: skip
    return sums


@dataclass
class TeacherForced:
    """The student read another model's answers token by token."""

    top1_hits: int
    """Positions where the student's most likely next token is the answer's."""
    nll: float
    """The student's negative log-likelihood of the answers' tokens, summed."""
    tokens: int
    """Answer tokens (the EOS that ends an answer included)."""


@torch.no_grad()
def teacher_forced(student, batch: RolloutBatch, *, temperature: float, max_tokens_per_mb: int,
                   vocab: int | None = None) -> TeacherForced:  # fmt: skip
    """The student teacher-forced on the answers in ``batch`` (the teacher's greedy answers): its
    top-1 agreement with them and its negative log-likelihood of them, from one forward pass.

    The log-likelihood is at ``temperature``, the student's rollout temperature, not at 1: that
    is the distribution the student samples from and the one its log-probs in the loss and in
    ``eval/reverse_kl`` use, so the NLL and the reverse KL describe the same distribution. At the
    default (and the demo's) rollout temperature of 1 it is the model's plain likelihood. The
    top-1 agreement does not depend on the temperature."""
    lengths = batch.attention_mask_BT.sum(1).tolist()
    hits, nll = 0, 0.0
    for rows in token_budget_microbatches(lengths, max_tokens_per_mb):
        stop.abandon_point()
        window = response_window(batch, rows)
        logits = window_logits(student, batch, window)[..., :vocab]
        ids = window.take(batch.input_ids_BT, logits.device)
        mask = window.take(batch.response_mask_BT, logits.device)
        hits += int(((logits.argmax(-1) == ids) & mask).sum())
        logp, _ = token_logprobs(logits, ids, temperature=temperature)
        nll -= logp[mask].sum().item()
    return TeacherForced(hits, nll, int(batch.response_mask_BT.sum()))


def answer_metrics(ans: Answers, eos_id: int, prefix: str) -> dict[str, float]:
    """Length and degeneracy signals of ``ans``, each averaged over answers, keys ``prefix +
    name`` (``len_mean`` and `kdrl.degeneracy.SIGNALS`)."""
    ids = ans.token_ids()
    means = {"len_mean": sum(map(len, ids)) / len(ids), **signal_means(ids, eos_id)}
    return {prefix + name: value for name, value in means.items()}


def task_metrics(
    ans: Answers, reference: Answers | None, correct_threshold: float, suffix: str = ""
) -> dict[str, float]:
    """``eval/accuracy`` under the task reward and ``eval/agreement`` (exact text, stripped, with
    the teacher's greedy answers in ``reference``), each named with ``suffix``; what exists."""
    metrics = {}
    if ans.rewards is not None:
        hits = sum(r >= correct_threshold for r in ans.rewards)
        metrics[f"eval/accuracy{suffix}"] = hits / len(ans.rewards)
    if reference is not None:
        same = [a.strip() == b.strip() for a, b in zip(ans.texts, reference.texts, strict=True)]
        metrics[f"eval/agreement{suffix}"] = sum(same) / len(same)
    return metrics


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
    greedy: bool,
    student_temperature: float,
    teacher_temperature: float,
    max_new_tokens: int,
    max_tokens_per_mb: int,
    seed: int = 0,
    synced: bool = False,
) -> tuple[dict[str, float], Answers]:
    """The student's answers at ``temperature`` and the ``eval/`` metrics (docs/training.md);
    ``reference`` holds the teacher's greedy answers on the same prompts, when there is a
    teacher. ``greedy`` adds greedy answers' accuracy and agreement (``_greedy`` keys): a second
    pass of answers, unless ``temperature`` is 0 and the first pass was already greedy."""
    was_training = student.training
    vocab = support_size(student, tokenizer)
    limits = dict(tokenizer=tokenizer, prompts=prompts, max_new_tokens=max_new_tokens,
                  reward_fn=reward_fn, synced=synced)  # fmt: skip
    student.eval()
    try:
        ans = answer(student, temperature=temperature, seed=seed, **limits)
        truncated = torch.cat([b.truncated_B for b in ans.batches]).float()
        metrics = answer_metrics(ans, tokenizer.eos_token_id, "eval/")
        metrics["eval/truncated_frac"] = truncated.mean().item()
        if ans.rewards is not None:
            metrics["eval/reward"] = sum(ans.rewards) / len(ans.rewards)
        metrics |= task_metrics(ans, reference, correct_threshold)
        if greedy or temperature == 0:
            greedy_ans = ans if temperature == 0 else answer(student, temperature=0.0, **limits)
            metrics |= task_metrics(greedy_ans, reference, correct_threshold, "_greedy")
        if teacher is not None:
            per_answer = [kl for b in ans.batches for kl in exact_reverse_kl_per_answer(
                student, teacher, b, student_temperature=student_temperature,
                teacher_temperature=teacher_temperature, max_tokens_per_mb=max_tokens_per_mb,
                vocab=vocab,
            )]  # fmt: skip
            tokens = sum(len(ids) for ids in ans.token_ids())
            metrics["eval/reverse_kl"] = sum(per_answer) / max(tokens, 1)
            metrics["eval/reverse_kl_seq"] = sum(per_answer) / len(per_answer)
        if reference is not None:
            forced = [teacher_forced(student, b, temperature=student_temperature,
                                     max_tokens_per_mb=max_tokens_per_mb, vocab=vocab)
                      for b in reference.batches]  # fmt: skip
            tokens = max(sum(f.tokens for f in forced), 1)
            metrics["eval/top1_agreement"] = sum(f.top1_hits for f in forced) / tokens
            metrics["eval/teacher_nll"] = sum(f.nll for f in forced) / tokens
    finally:
        student.train(was_training)
    return metrics, ans


def teacher_reference(teacher, tokenizer, prompts, *, max_new_tokens, reward_fn, correct_threshold):
    """The teacher's greedy answers (the reference for agreement), its own accuracy, and its
    answers' length and degeneracy signals (``eval/teacher_*``)."""
    ref = answer(teacher, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens,
                 reward_fn=reward_fn)  # fmt: skip
    metrics = answer_metrics(ref, tokenizer.eos_token_id, "eval/teacher_")
    if ref.rewards is not None:
        metrics["eval/teacher_accuracy"] = sum(r >= correct_threshold for r in ref.rewards) / len(
            ref.rewards
        )
    return ref, metrics


def answer_rows(ans: Answers, reference: Answers | None) -> list[dict]:
    """One row per prompt: the prompt as written, the student's answer and its reward, the
    teacher's greedy answer (when there is a teacher) and the reference answer."""
    rows = ans.rows()
    for i, row in enumerate(rows):
        row["student"] = row.pop("response")
        if reference is not None:
            row["teacher"] = reference.texts[i]
    return rows


def evaluate_model(cfg, model: str) -> tuple[dict[str, float], list[dict]]:
    """`kdrl eval`: load ``model`` as the student and the configured teacher, evaluate on
    ``eval.path`` (all of it unless ``eval.max_prompts``); the metrics and `answer_rows`."""
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
    metrics, ans = evaluate(
        student, tokenizer, prompts, teacher=teacher, reference=reference,
        temperature=cfg.eval.temperature, greedy=cfg.eval.greedy,
        student_temperature=cfg.rollout.temperature, teacher_temperature=cfg.teacher.temperature,
        max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb, **limits,
    )  # fmt: skip
    metrics = {"eval/prompts": float(len(prompts)), **metrics, **teacher_metrics}
    return metrics, answer_rows(ans, reference)


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
        reference=run.eval_reference, temperature=cfg.eval.temperature, greedy=cfg.eval.greedy,
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
