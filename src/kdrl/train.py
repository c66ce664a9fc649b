"""The training loop: sample -> reward -> teacher -> advantages -> update -> metrics -> checkpoint.

Shape legend: ``P`` prompts per step, ``G`` samples per prompt, ``B = P * G`` sequences.

Everything the loop needs is built once by :func:`build` into a :class:`Run`; :func:`train`
then reads top to bottom. No hidden global state: the data position, RNG states, optimizer and
schedule live in the checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdrl.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from kdrl.config import Config, config_to_dict, dump_config
from kdrl.data import Prompt, load_prompts
from kdrl.divergences import DIVERGENCES
from kdrl.evaluate import Answers, evaluate, teacher_reference
from kdrl.grpo import group_advantages
from kdrl.metrics import MetricsWriter
from kdrl.models import load_student, load_teacher, load_tokenizer
from kdrl.preflight import check_models
from kdrl.rewards import RewardFn, compute_rewards, get_reward_fn
from kdrl.rollout import HFRollout, Rollout, RolloutBatch
from kdrl.run_dir import prepare_output_dir
from kdrl.sampler import PromptSampler
from kdrl.schedule import build_optimizer, distill_weight
from kdrl.teacher import LocalTeacher, Teacher, TeacherOutput
from kdrl.update import LossSettings, UpdateBatch, policy_update

log = logging.getLogger("kdrl")


@dataclass
class Run:
    """Everything the loop works with, built once."""

    cfg: Config
    output_dir: Path
    student: torch.nn.Module
    tokenizer: object
    teacher_model: torch.nn.Module | None
    teacher: Teacher | None
    rollout: Rollout
    reward_fn: RewardFn | None
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    sampler: PromptSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    eval_reference: Answers | None = None
    """The teacher's greedy answers on the held-out prompts, computed at the first evaluation."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, output_dir: Path, checkpoint: Path | None) -> Run:
    """Load models and data, run the preflight checks, restore a checkpoint if given."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.student.path)
    student = load_student(
        str(checkpoint) if checkpoint else cfg.student.path,
        dtype=cfg.student.dtype, gradient_checkpointing=cfg.student.gradient_checkpointing,
        device=cfg.train.device,
    )  # fmt: skip
    teacher_model = teacher = None
    if cfg.teacher.path:
        teacher_model = load_teacher(
            cfg.teacher.path, dtype=cfg.teacher.dtype, device=cfg.train.device
        )
        teacher_tok = load_tokenizer(cfg.teacher.path, key="teacher.path")
        for warning in check_models(
            student, teacher_model, tokenizer, teacher_tok,
            student_name=cfg.student.path, teacher_name=cfg.teacher.path,
        ):  # fmt: skip
            log.warning("preflight: %s", warning)
        teacher = LocalTeacher(
            teacher_model, temperature=cfg.teacher.temperature,
            max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb,
            vocab=student.get_output_embeddings().weight.shape[0],
        )  # fmt: skip
    prompts = load_prompts(cfg.data, tokenizer).prompts
    eval_prompts = []
    if cfg.eval.path:
        eval_prompts = load_prompts(
            cfg.data, tokenizer, path=cfg.eval.path, split=cfg.eval.split,
            limit=cfg.eval.max_prompts,
        ).prompts  # fmt: skip
    sampler = PromptSampler(
        len(prompts), cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
    )  # fmt: skip
    optimizer, scheduler = build_optimizer(
        student, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        total_steps=sampler.total_steps * cfg.train.ppo_n_minibatches,
        warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.lr_schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
    )  # fmt: skip
    rollout = HFRollout(
        student, tokenizer, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
    )  # fmt: skip
    run = Run(
        cfg, output_dir, student, tokenizer, teacher_model, teacher, rollout,
        get_reward_fn(cfg.reward.fn), prompts, eval_prompts, sampler, optimizer, scheduler,
    )  # fmt: skip
    if checkpoint is not None:
        state = load_trainer_state(checkpoint, verify=False)  # verified when it was found
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        run.step = state["step"]
        log.info("resumed from %s at step %d", checkpoint, run.step)
    return run


def loss_settings(cfg: Config, step: int) -> LossSettings:
    t, g = cfg.teacher, cfg.grpo
    weight = distill_weight(
        step, start=t.distill_loss_weight, final=t.distill_loss_weight_final,
        decay_steps=t.distill_decay_steps,
    )  # fmt: skip
    return LossSettings(
        rl_loss_weight=t.rl_loss_weight, distill_loss_weight=weight,
        kd_estimator=t.kd_estimator, kd_discount=t.kd_discount, kd_eps_clip=t.kd_eps_clip,
        jsd_beta=t.jsd_beta, student_temperature=cfg.rollout.temperature,
        eps_clip=g.eps_clip, eps_clip_higher=g.eps_clip_higher, c_clip=g.c_clip,
    )  # fmt: skip


def score_rewards(run: Run, batch: RolloutBatch, prompts: list[Prompt]) -> torch.Tensor:
    """Rewards ``[B]``; zeros when there is no reward function (pure distillation)."""
    if run.reward_fn is None:
        return torch.zeros(batch.num_sequences)
    answers = [p.answer for p in prompts for _ in range(run.cfg.rollout.n_samples)]
    rewards = compute_rewards(run.reward_fn, batch.response_texts, answers, batch.prompt_index_B)
    return torch.tensor(rewards, dtype=torch.float32)


def score_teacher(run: Run, batch: RolloutBatch) -> TeacherOutput:
    if run.teacher is None:
        return TeacherOutput(torch.zeros(batch.input_ids_BT.shape))
    full = run.cfg.teacher.kd_estimator in DIVERGENCES
    # No top_k for a full-distribution loss means the whole vocabulary (the teacher caps it).
    top_k = (run.cfg.teacher.top_k or 1 << 62) if full else 0
    return run.teacher.score(batch, top_k=top_k)


def rollout_metrics(run: Run, batch: RolloutBatch, rewards_B, teacher: TeacherOutput):
    mask = batch.response_mask_BT
    metrics = {
        "rollout/len_mean": batch.response_len_B.float().mean().item(),
        "rollout/truncated_frac": batch.truncated_B.float().mean().item(),
    }
    if run.reward_fn is not None:
        metrics["reward/mean"] = rewards_B.mean().item()
        metrics["reward/accuracy"] = (
            (rewards_B >= run.cfg.reward.correct_threshold).float().mean().item()
        )
    if run.teacher is not None:
        # One-token estimate of the per-token reverse KL on the student's own samples.
        log_ratio = torch.where(mask, batch.behav_logprobs_BT - teacher.logprobs_BT, 0.0)
        metrics["rollout/reverse_kl"] = (log_ratio.sum() / mask.sum().clamp(min=1)).item()
    return metrics


def train_step(run: Run) -> dict[str, float] | None:
    """One step on the next batch of prompts; None when the data is exhausted."""
    cfg = run.cfg
    indices = run.sampler.next_batch()
    if indices is None:
        return None
    prompts = [run.prompts[i] for i in indices]
    t0 = time.perf_counter()
    batch = run.rollout.generate(prompts, n_samples=cfg.rollout.n_samples)
    t1 = time.perf_counter()
    rewards_B = score_rewards(run, batch, prompts)
    t2 = time.perf_counter()
    teacher_out = score_teacher(run, batch)
    t3 = time.perf_counter()
    advantages_B = group_advantages(
        rewards_B.view(len(prompts), cfg.rollout.n_samples),
        reward_scaling=cfg.grpo.reward_scaling, reward_bias=cfg.grpo.reward_bias,
        std_norm=cfg.grpo.adv_std_norm,
    ).view(-1)  # fmt: skip
    kd_weights_B = torch.ones_like(rewards_B)
    if run.reward_fn is not None:  # KDRL reward-guided masking of already-correct answers
        correct = rewards_B >= cfg.reward.correct_threshold
        kd_weights_B = torch.where(correct, cfg.teacher.kd_correct_weight, 1.0)
    settings = loss_settings(cfg, run.step)
    metrics = policy_update(
        run.student, run.optimizer, run.scheduler,
        UpdateBatch(batch, teacher_out, advantages_B, kd_weights_B), settings,
        n_minibatches=cfg.train.ppo_n_minibatches,
        max_tokens_per_mb=cfg.train.mb_spec.max_tokens_per_mb,
        max_grad_norm=cfg.optim.max_grad_norm,
    )  # fmt: skip
    run.rollout.sync_weights(run.student)
    t4 = time.perf_counter()
    run.step += 1
    tokens = int(batch.response_mask_BT.sum())
    return {
        **rollout_metrics(run, batch, rewards_B, teacher_out),
        **metrics,
        "kd/weight": settings.distill_loss_weight,
        "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/teacher": t3 - t2,
        "time/update": t4 - t3, "time/step": t4 - t0,
        "perf/response_tokens_per_s": tokens / max(t4 - t0, 1e-9),
    }  # fmt: skip


def run_eval(run: Run) -> dict[str, float]:
    """Evaluate on the held-out prompts; answers go to ``samples/step-%08d.jsonl``. The first
    call also records the teacher's greedy answers (``samples/teacher.jsonl``)."""
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
        _write_rows(run.output_dir / "samples" / "teacher.jsonl", run.eval_reference.rows())
    metrics, answers = evaluate(
        run.student, run.tokenizer, run.eval_prompts, teacher=run.teacher_model,
        reference=run.eval_reference, temperature=cfg.eval.temperature,
        student_temperature=cfg.rollout.temperature, teacher_temperature=cfg.teacher.temperature,
        max_tokens_per_mb=cfg.teacher.mb_spec.max_tokens_per_mb, **limits,
    )  # fmt: skip
    _write_rows(run.output_dir / "samples" / f"step-{run.step:08d}.jsonl", answers.rows())
    return metrics | extra


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def save(run: Run) -> Path:
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "rng": capture_rng_state(),
    }
    return save_checkpoint(
        run.output_dir, run.step, model=run.student, tokenizer=run.tokenizer,
        trainer_state=state, keep=run.cfg.train.keep_checkpoints,
    )  # fmt: skip


def train(cfg: Config, *, resume: bool = False, force: bool = False) -> Path:
    """Run training to the end; returns the final checkpoint (a Hugging Face model folder)."""
    output_dir = prepare_output_dir(cfg, resume=resume, force=force)
    checkpoint = find_latest_checkpoint(output_dir) if resume else None
    run = build(cfg, output_dir, checkpoint)
    dump_config(cfg, output_dir / "config.yaml")
    every, eval_every = cfg.train.save_every_steps, cfg.eval.every_steps
    with MetricsWriter(
        output_dir, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb,
        config=config_to_dict(cfg), resume_step=run.step if checkpoint else None,
    ) as writer:  # fmt: skip
        if run.step == 0 and run.eval_prompts:
            writer.write(0, run_eval(run))
        bar = tqdm(total=run.sampler.total_steps, initial=run.step, desc="kdrl train", unit="step")
        last_saved = run.step if checkpoint else -1
        while (metrics := train_step(run)) is not None:
            last = run.step >= run.sampler.total_steps
            if last or (eval_every and run.step % eval_every == 0):
                metrics |= run_eval(run)
            writer.write(run.step, metrics)
            bar.update(1)
            bar.set_postfix(_postfix(metrics), refresh=False)
            if every and run.step % every == 0:
                save(run)
                last_saved = run.step
        bar.close()
        final = save(run) if last_saved != run.step else find_latest_checkpoint(output_dir)
    log.info("done: %d steps; final model in %s", run.step, final)
    assert final is not None
    return final


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    keys = {"reward/mean": "reward", "rollout/reverse_kl": "rkl", "loss/total": "loss"}
    return {short: f"{metrics[k]:.3f}" for k, short in keys.items() if k in metrics}
