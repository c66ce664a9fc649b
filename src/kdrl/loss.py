"""The joint KDRL loss: ``rl_loss_weight * L_grpo + distill_loss_weight * L_kd``.

Shape legend: ``B`` sequences, ``T`` token positions, ``V`` vocabulary, ``K`` teacher top-k.
``rl_loss_weight = 0`` is pure distillation; ``distill_loss_weight = 0`` is pure GRPO. A term
whose weight is 0 is not computed. ``L_kd`` is a sampled-token estimator
(``kdrl.kd.SAMPLED_KD_LOSSES``) or a full-distribution divergence
(``kdrl.divergences.DIVERGENCES``), chosen by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdrl.divergences import DIVERGENCES, topk_divergence_loss
from kdrl.grpo import ppo_policy_loss
from kdrl.kd import SAMPLED_KD_LOSSES, kd_metrics
from kdrl.masking import where_valid

KD_ESTIMATORS = sorted([*SAMPLED_KD_LOSSES, *DIVERGENCES])


@dataclass
class TeacherDistribution:
    """What full-distribution divergences need: the student's logits at each position (aligned
    with the tokens, i.e. the logits that predicted them) and the teacher's top-k there."""

    student_logits_BTV: Tensor
    teacher_topk_logprobs_BTK: Tensor
    teacher_topk_ids_BTK: Tensor


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
    kd_weights_BT: Tensor | None = None,
    distribution: TeacherDistribution | None = None,
    jsd_beta: float = 0.5,
    student_temperature: float = 1.0,
    eps_clip: float = 0.2,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    num_tokens: float,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the GRPO clipped surrogate and a distillation loss.

    Both terms are token sums over ``mask_BT`` divided by the same global ``num_tokens``, so the
    weights mean what they say and micro-batch losses add up to the full-batch loss.
    ``kd_weights_BT`` scales the distillation term per token (reward-guided masking).
    """
    if rl_loss_weight < 0 or distill_loss_weight < 0:
        raise ValueError("rl_loss_weight and distill_loss_weight must be >= 0")
    if rl_loss_weight == 0 and distill_loss_weight == 0:
        raise ValueError("rl_loss_weight and distill_loss_weight are both 0: nothing to train")
    if kd_estimator not in KD_ESTIMATORS:
        raise ValueError(f"unknown kd_estimator {kd_estimator!r}; expected one of {KD_ESTIMATORS}")
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
        if kd_estimator in SAMPLED_KD_LOSSES:
            kd, m = SAMPLED_KD_LOSSES[kd_estimator](
                logprobs_BT, behav_logprobs_BT, teacher_logprobs_BT, mask_BT,
                discount=kd_discount, eps_clip=kd_eps_clip, weights_BT=kd_weights_BT,
                num_tokens=num_tokens,
            )  # fmt: skip
        else:
            if distribution is None:
                raise ValueError(f"kd_estimator {kd_estimator!r} needs the teacher's distribution")
            kd = topk_divergence_loss(
                distribution.student_logits_BTV, distribution.teacher_topk_logprobs_BTK,
                distribution.teacher_topk_ids_BTK, mask_BT, kind=kd_estimator, beta=jsd_beta,
                student_temperature=student_temperature, num_tokens=num_tokens,
                weights=kd_weights_BT,
            )  # fmt: skip
            log_ratio = where_valid(logprobs_BT.detach() - teacher_logprobs_BT, mask_BT)
            m = {"loss/kd": kd.item(), **kd_metrics(log_ratio, mask_BT, num_tokens)}
        loss, metrics = loss + distill_loss_weight * kd, metrics | m
    metrics["loss/total"] = loss.item()
    return loss, metrics
