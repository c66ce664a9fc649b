"""The joint KDRL loss on sampled tokens: ``rl_loss_weight * L_grpo + distill_loss_weight * L_kd``.

Shape legend: ``B`` sequences, ``T`` token positions. ``rl_loss_weight = 0`` is pure
distillation; ``distill_loss_weight = 0`` is pure GRPO. A term whose weight is 0 is not computed.
"""

from __future__ import annotations

from torch import Tensor

from kdrl.grpo import ppo_policy_loss
from kdrl.kd import SAMPLED_KD_LOSSES


def kdrl_loss(
    logprobs_BT: Tensor,
    behav_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor | None,
    advantages_BT: Tensor | None,
    mask_BT: Tensor,
    *,
    rl_loss_weight: float,
    distill_loss_weight: float,
    kd_estimator: str,
    kd_discount: float = 0.0,
    kd_eps_clip: float | None = None,
    eps_clip: float = 0.2,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    num_tokens: float,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the GRPO clipped surrogate and a sampled-token distillation loss.

    Both terms are token sums over ``mask_BT`` divided by the same global ``num_tokens``, so the
    weights mean what they say and micro-batch losses add up to the full-batch loss. The
    distillation term is chosen by name from ``kdrl.kd.SAMPLED_KD_LOSSES``.
    """
    if rl_loss_weight < 0 or distill_loss_weight < 0:
        raise ValueError("rl_loss_weight and distill_loss_weight must be >= 0")
    if rl_loss_weight == 0 and distill_loss_weight == 0:
        raise ValueError("rl_loss_weight and distill_loss_weight are both 0: nothing to train")
    if kd_estimator not in SAMPLED_KD_LOSSES:
        raise ValueError(
            f"unknown sampled-token kd_estimator {kd_estimator!r}; "
            f"expected one of {sorted(SAMPLED_KD_LOSSES)}"
        )
    loss = logprobs_BT.new_zeros(())
    metrics: dict[str, float] = {}
    if rl_loss_weight > 0:
        if advantages_BT is None:
            raise ValueError("rl_loss_weight > 0 needs advantages")
        rl, m = ppo_policy_loss(
            logprobs_BT, behav_logprobs_BT, advantages_BT, mask_BT,
            eps_clip=eps_clip, eps_clip_higher=eps_clip_higher, c_clip=c_clip,
            num_tokens=num_tokens,
        )  # fmt: skip
        loss, metrics = loss + rl_loss_weight * rl, metrics | m
    if distill_loss_weight > 0:
        if teacher_logprobs_BT is None:
            raise ValueError("distill_loss_weight > 0 needs teacher log-probs")
        kd, m = SAMPLED_KD_LOSSES[kd_estimator](
            logprobs_BT, behav_logprobs_BT, teacher_logprobs_BT, mask_BT,
            discount=kd_discount, eps_clip=kd_eps_clip, num_tokens=num_tokens,
        )  # fmt: skip
        loss, metrics = loss + distill_loss_weight * kd, metrics | m
    metrics["loss/total"] = loss.item()
    return loss, metrics
