"""One policy update on a rollout batch: minibatches of optimizer steps, each accumulated over
token-budget micro-batches.

Shape legend: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``K`` teacher top-k. Inside a
micro-batch every ``*_BT`` tensor covers the micro-batch's response window (`kdrl.forward`):
column ``j`` is about token ``window.start + j``, predicted by the logits at the position
before it.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from kdrl.divergences import DIVERGENCES
from kdrl.forward import response_window, window_logits
from kdrl.grpo import sequence_to_tokens
from kdrl.logprobs import token_logprobs
from kdrl.loss import TeacherDistribution, kdrl_loss
from kdrl.masking import masked_sum
from kdrl.microbatch import token_budget_microbatches
from kdrl.rollout import RolloutBatch
from kdrl.teacher import TeacherOutput


class NonFiniteError(RuntimeError):
    """A loss or gradient norm was nan/inf; raised before the optimizer touches the weights."""


@dataclass
class LossSettings:
    """The loss knobs of one update (the distillation weight may follow a schedule)."""

    rl_loss_weight: float
    distill_loss_weight: float
    kd_estimator: str
    kd_discount: float
    kd_eps_clip: float | None
    jsd_beta: float
    student_temperature: float
    eps_clip: float
    eps_clip_higher: float | None
    c_clip: float | None


@dataclass
class UpdateBatch:
    rollout: RolloutBatch
    teacher: TeacherOutput
    advantages_B: Tensor
    kd_weights_B: Tensor


def _forward_logprobs(model, rollout: RolloutBatch, rows: list[int], temperature: float):
    """Student logits and log-probs of the tokens in the response window of ``rows``."""
    window = response_window(rollout, rows)
    logits_BTV = window_logits(model, rollout, window)
    ids_BT = window.take(rollout.input_ids_BT, logits_BTV.device)
    lp_BT, ent_BT = token_logprobs(logits_BTV, ids_BT, temperature=temperature, with_entropy=True)
    return logits_BTV, lp_BT, ent_BT, window


@torch.no_grad()
def recompute_logprobs(model, rollout: RolloutBatch, *, temperature: float, max_tokens: int):
    """Log-probs of every token under the current student (PPO's "old" policy), ``[B, T]``."""
    out = torch.zeros(rollout.input_ids_BT.shape, dtype=torch.float32)
    lengths = rollout.attention_mask_BT.sum(1).tolist()
    for rows in token_budget_microbatches(lengths, max_tokens):
        _, lp_BT, _, window = _forward_logprobs(model, rollout, rows, temperature)
        out[rows, window.start : window.stop] = lp_BT.cpu()
    return out


def _microbatch_loss(model, data: UpdateBatch, rows, old_BT, s: LossSettings, num_tokens):
    r = data.rollout
    logits_BTV, lp_BT, ent_BT, window = _forward_logprobs(model, r, rows, s.student_temperature)
    device = lp_BT.device

    def take(x: Tensor) -> Tensor:
        return window.take(x, device)

    mask_BT = take(r.response_mask_BT)
    teacher = data.teacher
    distribution = None
    if s.kd_estimator in DIVERGENCES and s.distill_loss_weight > 0:
        assert teacher.topk_logprobs_BTK is not None and teacher.topk_ids_BTK is not None
        distribution = TeacherDistribution(
            logits_BTV, take(teacher.topk_logprobs_BTK), take(teacher.topk_ids_BTK)
        )
    old = lp_BT.detach() if old_BT is None else take(old_BT)
    loss, metrics = kdrl_loss(
        lp_BT, old, take(teacher.logprobs_BT),
        sequence_to_tokens(data.advantages_B[rows].to(device), mask_BT), mask_BT,
        rl_loss_weight=s.rl_loss_weight, distill_loss_weight=s.distill_loss_weight,
        kd_estimator=s.kd_estimator, kd_discount=s.kd_discount, kd_eps_clip=s.kd_eps_clip,
        kd_weights_BT=sequence_to_tokens(data.kd_weights_B[rows].to(device), mask_BT),
        distribution=distribution, jsd_beta=s.jsd_beta,
        student_temperature=s.student_temperature, eps_clip=s.eps_clip,
        eps_clip_higher=s.eps_clip_higher, c_clip=s.c_clip, num_tokens=num_tokens,
    )  # fmt: skip
    metrics["actor/entropy"] = masked_sum(ent_BT.detach(), mask_BT).item() / num_tokens
    return loss, metrics


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: UpdateBatch,
    settings: LossSettings,
    *,
    n_minibatches: int,
    max_tokens_per_mb: int,
    max_grad_norm: float,
) -> dict[str, float]:
    """``n_minibatches`` optimizer steps over consecutive shares of the batch. Each step's loss
    is normalised by its share's response-token count; metrics are averaged over steps."""
    b = data.rollout.num_sequences
    if not 1 <= n_minibatches <= b:
        raise ValueError(f"ppo_n_minibatches must be in [1, {b}] for {b} sequences")
    old_BT = None
    if n_minibatches > 1:  # later minibatches are off-policy: keep the pre-update log-probs
        old_BT = recompute_logprobs(
            model, data.rollout, temperature=settings.student_temperature,
            max_tokens=max_tokens_per_mb,
        )  # fmt: skip
    bounds = [round(i * b / n_minibatches) for i in range(n_minibatches + 1)]
    totals: dict[str, float] = defaultdict(float)
    params = [p for p in model.parameters() if p.requires_grad]
    for lo, hi in itertools.pairwise(bounds):
        share = list(range(lo, hi))
        num_tokens = float(data.rollout.response_mask_BT[share, 1:].sum().clamp(min=1))
        lengths = data.rollout.attention_mask_BT[share].sum(1).tolist()
        for group in token_budget_microbatches(lengths, max_tokens_per_mb):
            rows = [share[i] for i in group]
            loss, metrics = _microbatch_loss(model, data, rows, old_BT, settings, num_tokens)
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(f"non-finite loss {loss.item()} ({metrics})")
            loss.backward()
            for key, value in metrics.items():
                totals[key] += value / n_minibatches
        clip = max_grad_norm if max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite gradient norm {grad_norm}")
        totals["optim/grad_norm"] += grad_norm / n_minibatches
        totals["optim/lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(totals)
