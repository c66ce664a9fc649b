"""The training loop: sample -> reward -> teacher -> advantages -> update -> metrics -> checkpoint.

Shape legend: ``P`` prompts per step, ``G`` samples per prompt, ``B = P * G`` sequences.

Everything the loop needs is built once by :func:`build` into a :class:`Run`; :func:`train`
then reads top to bottom. No hidden global state: the data position, RNG states, optimizer and
schedule live in the checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kdrl.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from kdrl.config import Config, config_to_dict, dump_config
from kdrl.data import Prompt, load_prompts
from kdrl.degeneracy import response_ids, signal_sums
from kdrl.distributed import (
    SINGLE,
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    device_for,
    full_model_state_dict,
    full_optimizer_state_dict,
    init_from_env,
    is_sharded,
    load_full_optimizer_state_dict,
    reduce_metrics,
    shutdown,
    unwrap,
    wrap_student,
)
from kdrl.divergences import DIVERGENCES
from kdrl.engines import make_rollout, make_teacher
from kdrl.evaluate import Answers, run_eval
from kdrl.grpo import group_advantages
from kdrl.guard import Guard
from kdrl.metrics import METRICS_FILE, MetricsWriter, read_metrics
from kdrl.models import load_student, load_tokenizer, support_size
from kdrl.nonfinite import NonFinite, skip_or_stop
from kdrl.recover import StepStart, keep_after_failure
from kdrl.rewards import CHECK_ROWS, RewardFn, check_reward_fn, compute_rewards, get_reward_fn
from kdrl.rollout import Rollout, RolloutBatch, sequence_seed
from kdrl.run_dir import prepare_output_dir, write_status
from kdrl.sampler import PromptSampler
from kdrl.schedule import build_optimizer, distill_weight
from kdrl.stop import StepAbandoned, StopRequest, abandon_point, handle_stop_signals, skippable
from kdrl.stop import rewind_on_abandon as rewind
from kdrl.teacher import Teacher, TeacherOutput
from kdrl.update import LossSettings, UpdateBatch, policy_update
from kdrl.verdict import log_verdict

log = logging.getLogger("kdrl")


@dataclass
class Run:
    """Everything the loop works with, built once."""

    cfg: Config
    output_dir: Path
    student: torch.nn.Module
    """What the update trains: the Hugging Face model, or its data-parallel wrapper."""
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
    ctx: DistContext = SINGLE
    step: int = 0
    eval_reference: Answers | None = None
    """The teacher's greedy answers on the held-out prompts, computed at the first evaluation."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm, over the whole run."""

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face student (for generation, evaluation and saving)."""
        return unwrap(self.student)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, output_dir: Path, checkpoint: Path | None, ctx: DistContext = SINGLE) -> Run:
    """Load models and data, run the preflight checks, restore a checkpoint if given."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % ctx.world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} does not divide by the {ctx.world} "
            "data-parallel ranks: every rank needs the same number of prompts"
        )
    seed_everything(cfg.seed)
    device = device_for(ctx, cfg.train.device)
    tokenizer = load_tokenizer(cfg.student.path)
    prompts, eval_prompts, reward_fn = load_data(cfg, tokenizer)  # before the slow model loads
    student = load_student(
        str(checkpoint) if checkpoint else cfg.student.path,
        dtype=cfg.student.dtype, gradient_checkpointing=cfg.student.gradient_checkpointing,
        device=device,
    )  # fmt: skip
    hf_student, student = student, wrap_student(student, ctx)
    teacher_model, teacher = make_teacher(cfg, hf_student, tokenizer, device=device)
    sampler = PromptSampler(
        len(prompts), cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
    )  # fmt: skip
    if cfg.train.max_steps > sampler.total_steps and ctx.is_main:
        log.warning(
            "train.max_steps=%d, but train.epochs=%d over %d prompts at train.batch_size=%d "
            "gives %d steps: the run stops there; raise train.epochs for more",
            cfg.train.max_steps, cfg.train.epochs, len(prompts), cfg.train.batch_size,
            sampler.total_steps,
        )  # fmt: skip
    optimizer, scheduler = build_optimizer(
        student, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        total_steps=sampler.total_steps * cfg.train.ppo_n_minibatches,
        warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.lr_schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
    )  # fmt: skip
    rollout = make_rollout(
        cfg, hf_student, tokenizer, model_path=str(checkpoint or cfg.student.path),
        sharded=is_sharded(student),
    )  # fmt: skip
    run = Run(
        cfg, output_dir, student, tokenizer, teacher_model, teacher, rollout,
        reward_fn, prompts, eval_prompts, sampler, optimizer, scheduler, ctx,
    )  # fmt: skip
    if checkpoint is not None:
        state = load_trainer_state(checkpoint, verify=False)  # verified when it was found
        load_full_optimizer_state_dict(student, optimizer, state["optimizer"], ctx)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        # Each rank continues its own RNG stream when the world size is unchanged.
        rng = state["rng"]
        restore_rng_state(rng[ctx.rank] if len(rng) == ctx.world else rng[0])
        run.step = state["step"]
        run.skipped_steps = state.get("skipped_steps", 0)  # absent from older checkpoints
        log.info("resumed from %s at step %d", checkpoint, run.step)
    return run


def load_data(cfg: Config, tokenizer) -> tuple[list[Prompt], list[Prompt], RewardFn | None]:
    """Training and held-out prompts, and the reward function, tried on the first rows."""
    prompts = load_prompts(cfg.data, tokenizer).prompts
    eval_prompts = []
    if cfg.eval.path:
        eval_prompts = load_prompts(
            cfg.data, tokenizer, path=cfg.eval.path, split=cfg.eval.split,
            limit=cfg.eval.max_prompts, key="eval.path",
        ).prompts  # fmt: skip
    reward_fn = get_reward_fn(cfg.reward.fn)
    if reward_fn is not None:
        rows = [(p.where, p.answer) for p in prompts[:CHECK_ROWS]]
        check_reward_fn(reward_fn, cfg.reward.fn, rows)
    return prompts, eval_prompts, reward_fn


def loss_settings(cfg: Config, step: int, vocab: int | None = None) -> LossSettings:
    t, g = cfg.teacher, cfg.grpo
    weight = distill_weight(
        step, start=t.distill_loss_weight, final=t.distill_loss_weight_final,
        decay_steps=t.distill_decay_steps,
    )  # fmt: skip
    return LossSettings(
        rl_loss_weight=t.rl_loss_weight, distill_loss_weight=weight,
        kd_estimator=t.kd_estimator, kd_discount=t.kd_discount, kd_eps_clip=t.kd_eps_clip,
        jsd_beta=t.jsd_beta, student_temperature=cfg.rollout.temperature,
        eps_clip=g.eps_clip, eps_clip_higher=g.eps_clip_higher, c_clip=g.c_clip, vocab=vocab,
    )  # fmt: skip


def score_rewards(run: Run, batch: RolloutBatch, prompts: list[Prompt]) -> torch.Tensor:
    """Rewards ``[B]``; zeros when there is no reward function (pure distillation)."""
    if run.reward_fn is None:
        return torch.zeros(batch.num_sequences)
    answers = [p.answer for p in prompts for _ in range(run.cfg.rollout.n_samples)]
    sources = [p.where for p in prompts for _ in range(run.cfg.rollout.n_samples)]
    rewards = compute_rewards(
        run.reward_fn, batch.response_texts, answers, batch.prompt_index_B, sources=sources
    )
    return torch.tensor(rewards, dtype=torch.float32)


def score_teacher(run: Run, batch: RolloutBatch) -> TeacherOutput:
    if run.teacher is None:
        return TeacherOutput(torch.zeros(batch.input_ids_BT.shape))
    full = run.cfg.teacher.kd_estimator in DIVERGENCES
    # No top_k for a full-distribution loss means the whole vocabulary (the teacher caps it).
    top_k = (run.cfg.teacher.top_k or 1 << 62) if full else 0
    return run.teacher.score(batch, top_k=top_k)


def rollout_metrics(run: Run, batch: RolloutBatch, rewards_B, teacher: TeacherOutput):
    """Per-step rollout metrics over the global batch: sums and counts meet over ranks first."""
    mask = batch.response_mask_BT
    sums = {
        "rollout/len_mean": batch.response_len_B.float().sum().item(),
        "rollout/truncated_frac": batch.truncated_B.float().sum().item(),
        "sequences": float(batch.num_sequences),
        "tokens": float(mask.sum()),
    }
    # Degeneracy signals (kdrl.degeneracy): per-answer sums, averaged over the global batch.
    signals = signal_sums(response_ids(batch.input_ids_BT, mask), run.tokenizer.eos_token_id)
    sums |= {f"rollout/{name}": value for name, value in signals.items()}
    if run.reward_fn is not None:
        sums["reward/mean"] = rewards_B.sum().item()
        correct = rewards_B >= run.cfg.reward.correct_threshold
        sums["reward/accuracy"] = correct.float().sum().item()
    if run.teacher is not None:
        # One-token estimate of the per-token reverse KL on the student's own samples.
        log_ratio = torch.where(mask, batch.behav_logprobs_BT - teacher.logprobs_BT, 0.0)
        sums["rollout/reverse_kl"] = log_ratio.sum().item()
    total = reduce_metrics(sums, run.ctx)
    sequences, tokens = total.pop("sequences"), total.pop("tokens")
    metrics = {k: v / sequences for k, v in total.items()}
    if "rollout/reverse_kl" in total:
        metrics["rollout/reverse_kl"] = total["rollout/reverse_kl"] / max(tokens, 1.0)
    return metrics, tokens


def train_step(run: Run) -> dict[str, float] | None:
    """One step on the next batch of prompts; None when the data is exhausted."""
    cfg = run.cfg
    indices = run.sampler.next_batch()
    if indices is None:
        return None
    prompts = run.ctx.shard([run.prompts[i] for i in indices])
    t0 = time.perf_counter()
    # Seeded per sequence: a prompt's samples do not depend on the rest of the batch or rank.
    batch = run.rollout.generate(
        prompts, n_samples=cfg.rollout.n_samples, seed=sequence_seed(cfg.seed, run.step, -1)
    )
    t1 = time.perf_counter()
    rewards_B = score_rewards(run, batch, prompts)
    t2 = time.perf_counter()
    teacher_out = score_teacher(run, batch)
    abandon_point()  # the last point a stop request drops the step: the update changes weights
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
    settings = loss_settings(cfg, run.step, support_size(run.model, run.tokenizer))

    def on_nonfinite(found: NonFinite) -> None:  # raises, or counts a skipped optimizer step
        run.skipped_steps = skip_or_stop(found, step=run.step + 1, skipped=run.skipped_steps,
                                         train=cfg.train, warn=run.ctx.is_main)  # fmt: skip

    metrics = policy_update(
        run.student, run.optimizer, run.scheduler,
        UpdateBatch(batch, teacher_out, advantages_B, kd_weights_B), settings,
        n_minibatches=cfg.train.ppo_n_minibatches,
        max_tokens_per_mb=cfg.train.mb_spec.max_tokens_per_mb,
        max_grad_norm=cfg.optim.max_grad_norm, ctx=run.ctx, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    if cfg.train.skip_nonfinite:
        metrics["optim/skipped_steps"] = float(run.skipped_steps)
    run.rollout.sync_weights(run.model)
    t4 = time.perf_counter()
    run.step += 1
    roll, tokens = rollout_metrics(run, batch, rewards_B, teacher_out)
    # A step lasts as long as its slowest rank.
    times = reduce_metrics({}, run.ctx, maxes={
        "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/teacher": t3 - t2,
        "time/update": t4 - t3, "time/step": t4 - t0,
    })  # fmt: skip
    return {
        **roll, **metrics, "kd/weight": settings.distill_loss_weight, **times,
        "perf/response_tokens_per_s": tokens / max(times["time/step"], 1e-9),
    }  # fmt: skip


def save(run: Run) -> Path | None:
    """Write a checkpoint a single process can load: weights and optimizer state gathered whole
    (collectives: every rank calls this), written by rank 0; the path on rank 0, None elsewhere."""
    weights = full_model_state_dict(run.student) if run.ctx.enabled else None
    state = {
        "step": run.step,
        "skipped_steps": run.skipped_steps,
        "optimizer": full_optimizer_state_dict(run.student, run.optimizer, run.ctx),
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "rng": all_gather_objects(capture_rng_state(), run.ctx),
    }
    path = None
    if run.ctx.is_main:
        path = save_checkpoint(
            run.output_dir, run.step, model=run.model, tokenizer=run.tokenizer,
            trainer_state=state, keep=run.cfg.train.keep_checkpoints, state_dict=weights,
        )  # fmt: skip
    barrier(run.ctx)
    return path


def train(cfg: Config, *, resume: bool = False, force: bool = False, restart: bool = False) -> Path:
    """Run training to the end; returns the final checkpoint (a Hugging Face model folder).
    Stopped by SIGTERM/SIGINT, it saves a checkpoint and raises :class:`kdrl.stop.Stopped`.

    Under ``torchrun`` every rank runs this; rank 0 alone touches the run directory."""
    ctx = init_from_env(cfg.train.parallel, cfg.train.device)
    error = None
    try:
        # SIGTERM/SIGINT: stop at a safe point and save (kdrl.stop); one process may abandon a
        # step mid-way, ranks under torchrun stop together after a step.
        with handle_stop_signals(abandon=not ctx.enabled, announce=ctx.is_main) as stop:
            return _train(cfg, ctx, stop, resume=resume, force=force, restart=restart)
    except BaseException as err:  # Stopped included: its frames still hold the run
        error = err
        raise
    finally:
        shutdown(ctx, error)


def _train(
    cfg: Config, ctx: DistContext, stop: StopRequest, *, resume: bool, force: bool, restart: bool
) -> Path:
    output_dir, checkpoint = None, None
    if ctx.is_main:
        output_dir = prepare_output_dir(cfg, resume=resume, force=force, restart=restart)
        checkpoint = find_latest_checkpoint(output_dir) if resume else None
    output_dir, checkpoint = broadcast_object((output_dir, checkpoint), ctx)
    run = build(cfg, output_dir, checkpoint, ctx)
    try:
        return _loop(run, checkpoint, stop)
    finally:
        run.rollout.close()  # before the process group goes: vLLM's teardown uses it


def _loop(run: Run, checkpoint: Path | None, stop: StopRequest) -> Path:
    cfg, ctx, output_dir = run.cfg, run.ctx, run.output_dir
    if ctx.is_main:
        dump_config(cfg, output_dir / "config.yaml")
    every, eval_every = cfg.train.save_every_steps, cfg.eval.every_steps
    with MetricsWriter(
        output_dir, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb,
        config=config_to_dict(cfg), resume_step=run.step if checkpoint else None,
        enabled=ctx.is_main,
    ) as writer:  # fmt: skip
        last_saved = run.step if checkpoint else -1
        began: StepStart | None = None
        guard = Guard(cfg, enabled=ctx.is_main)  # the metrics are reduced: one rank speaks
        # Closed on errors too, so the error message is the last thing on the terminal; log
        # lines (the guard's warnings) print above the bar instead of through it.
        with logging_redirect_tqdm(), tqdm(total=run.sampler.total_steps, initial=run.step,
                  desc="kdrl train", unit="step", disable=not ctx.is_main) as bar:  # fmt: skip
            try:
                if run.step == 0 and run.eval_prompts:
                    first = run_eval(run)
                    writer.write(0, first)
                    guard.warn(0, first)
                while not stop.agreed(ctx):  # every rank stops after the same step
                    began = StepStart.capture(run)
                    with rewind(run.sampler, run.step + 1):  # an abandoned step leaves no trace
                        metrics = train_step(run)
                    if metrics is None:
                        break
                    began.metrics = metrics  # trained: written below, or on a failure
                    last = run.step >= run.sampler.total_steps
                    if last or (eval_every and run.step % eval_every == 0):
                        metrics |= skippable(run_eval, run, what=f"evaluation at step {run.step}")
                    writer.write(run.step, metrics)
                    began.metrics = None
                    guard.warn(run.step, metrics)
                    bar.update(1)
                    bar.set_postfix(_postfix(metrics), refresh=False)
                    if every and run.step % every == 0:
                        save(run)
                        last_saved = run.step
            except StepAbandoned:
                pass  # nothing of the abandoned step (or first evaluation) was kept
            except Exception as err:
                bar.close()
                keep_after_failure(run, began, last_saved, writer, save=save)
                if ctx.is_main:
                    write_status(output_dir, state="failed", step=run.step,
                                 planned=run.sampler.total_steps,
                                 reason=f"{type(err).__name__}: {err}")  # fmt: skip
                raise
        final = checkpoint_path(output_dir, run.step)
        stopped = stop.requested and run.step < run.sampler.total_steps
        if stopped and checkpoint is None and run.step == 0:
            final = None  # nothing trained yet: nothing to save
        elif last_saved != run.step:
            save(run)
    if ctx.is_main:
        write_status(output_dir, state="stopped" if stopped else "finished", step=run.step,
                     planned=run.sampler.total_steps,
                     reason=f"stopped by {stop.name}" if stopped else "")  # fmt: skip
    if stopped:  # raises kdrl.stop.Stopped
        stop.finish(run.step, run.sampler.total_steps, final, output_dir, main=ctx.is_main)
    if ctx.is_main and run.eval_prompts:
        log_verdict(read_metrics(output_dir / METRICS_FILE), cfg)
    log.info("done: %d steps; final model in %s", run.step, final)
    return final


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    keys = {"reward/mean": "reward", "rollout/reverse_kl": "rkl", "loss/total": "loss"}
    return {short: f"{metrics[k]:.3f}" for k, short in keys.items() if k in metrics}
