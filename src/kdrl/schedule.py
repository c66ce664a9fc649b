"""Schedules: the learning rate (warmup then decay) and the KDRL distillation weight."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``:
    linear warmup over ``warmup`` steps, then ``constant``, ``linear`` or ``cosine`` decay to
    ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters with a per-optimizer-step LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def factor(step: int) -> float:
        return lr_factor(
            step, total=total_steps, warmup=warmup_steps, kind=schedule, min_ratio=min_lr_ratio
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distill_weight(step: int, *, start: float, final: float | None, decay_steps: int) -> float:
    """KDRL's distillation-weight schedule at training step ``step`` (0-based): constant, or
    linear from ``start`` to ``final`` over ``decay_steps`` steps, then ``final``."""
    if final is None or decay_steps <= 0:
        return start
    progress = min(1.0, step / decay_steps)
    return start + (final - start) * progress
