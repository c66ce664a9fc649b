"""Distillation on the student's own sampled tokens (the teacher gives one log-prob per token).

Shape legend: ``B`` sequences, ``T`` token positions. Inputs, aligned position by position:
``logprobs_BT`` the student's log-probs of the sampled tokens (with gradient), ``behav_logprobs_BT``
those of the policy that sampled them (no gradient; equal to ``logprobs_BT`` when on-policy),
``teacher_logprobs_BT`` the teacher's (no gradient; may be ``-inf`` at masked positions).

Each estimator returns ``(loss, metrics)`` with loss ``= sum_valid(w_t l_t) / num_tokens``, ``w``
optional per-token weights (1 when not given). Writing
``r_t = log p_T(x_t|h_t) - log q(x_t|h_t)`` (the per-token reward of reverse KL), the exact
expected gradients, derived in docs/math.md and checked by enumeration in tests/, are:

* ``pg``: ``l_t = -sg(G_t) * rho_t`` with ``rho_t = q/q_behav`` and ``G_t`` the discounted
  reward-to-go of ``sg(r)``. ``discount = 0``: the per-token reverse KL gradient
  ``E_h[grad KL(q(.|h) || p_T(.|h))]``; ``discount = 1``: the gradient of the sequence-level
  ``KL(q(x) || p_T(x))``. Optional PPO clipping of ``rho``.
* ``k2``: ``l_t = sg(rho_t) * (log q - log p_T)^2 / 2``: the per-token reverse KL gradient.
* ``seed_k1``: ``l_t = log q - log p_T`` added straight to the loss, as the reference's joint
  KDRL loss does. Its expected gradient is exactly zero (``E_q[grad log q] = 0``): it is kept
  only to reproduce the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdrl.masking import check_num_tokens, masked_sum, where_valid

KDMetrics = dict[str, float]


def reward_to_go(rewards_BT: Tensor, mask_BT: Tensor, *, discount: float) -> Tensor:
    """``G_t = r_t + discount * G_{t'}`` over the valid positions of each row, ``t'`` the next
    valid position; masked positions add no reward and no discount. ``discount`` in [0, 1]."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    r_BT = where_valid(rewards_BT, mask_BT)
    if discount == 0.0:
        return r_BT
    if discount == 1.0:
        return r_BT.flip(-1).cumsum(-1).flip(-1)
    out_BT = torch.empty_like(r_BT)
    g_B = torch.zeros_like(r_BT[:, 0])
    for t in range(r_BT.shape[1] - 1, -1, -1):
        g_B = torch.where(mask_BT[:, t], r_BT[:, t] + discount * g_B, g_B)
        out_BT[:, t] = g_B
    return out_BT


def _weighted(loss_BT: Tensor, weights_BT: Tensor | None) -> Tensor:
    # Per-token weights (reward-guided masking): 0 drops a token's term, 1 keeps it.
    return loss_BT if weights_BT is None else loss_BT * weights_BT.detach()


def kd_metrics(log_ratio_BT: Tensor, mask_BT: Tensor, num_tokens: float) -> KDMetrics:
    # k1 = log q - log p_T is an unbiased per-token sample of the reverse KL; k3 = e^{-k1}-1+k1
    # is its low-variance, always non-negative companion (Schulman, "Approximating KL").
    with torch.no_grad():
        k1 = masked_sum(log_ratio_BT, mask_BT).item() / num_tokens
        k3_BT = torch.expm1(-log_ratio_BT) + log_ratio_BT
        return {
            "kd/reverse_kl": k1,
            "kd/reverse_kl_k3": masked_sum(k3_BT, mask_BT).item() / num_tokens,
        }


def kd_pg_loss(
    logprobs_BT: Tensor,
    behav_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    discount: float = 0.0,
    eps_clip: float | None = None,
    weights_BT: Tensor | None = None,
    num_tokens: float,
) -> tuple[Tensor, KDMetrics]:
    """Importance-sampled reverse-KL policy gradient (``pg``); see the module docstring."""
    check_num_tokens(num_tokens)
    log_ratio_BT = where_valid(logprobs_BT.detach() - teacher_logprobs_BT.detach(), mask_BT)
    adv_BT = reward_to_go(-log_ratio_BT, mask_BT, discount=discount)
    ratio_BT = torch.exp(where_valid(logprobs_BT - behav_logprobs_BT.detach(), mask_BT))
    loss_BT = -adv_BT * ratio_BT
    if eps_clip is not None:
        clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - eps_clip, 1.0 + eps_clip)
        loss_BT = torch.maximum(loss_BT, clipped_BT)
    loss = masked_sum(_weighted(loss_BT, weights_BT), mask_BT) / num_tokens
    return loss, {"loss/kd": loss.item(), **kd_metrics(log_ratio_BT, mask_BT, num_tokens)}


def kd_k2_loss(
    logprobs_BT: Tensor,
    behav_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    discount: float = 0.0,
    eps_clip: float | None = None,
    weights_BT: Tensor | None = None,
    num_tokens: float,
) -> tuple[Tensor, KDMetrics]:
    """Squared log-ratio as a loss (``k2``), importance-weighted by the detached ratio so that
    stale samples still estimate the per-token reverse KL gradient. Per-token only."""
    check_num_tokens(num_tokens)
    if discount != 0.0:
        raise ValueError(f"k2 is a per-token estimator: discount must be 0, got {discount}")
    log_ratio_BT = where_valid(logprobs_BT - teacher_logprobs_BT.detach(), mask_BT)
    weight_BT = torch.exp(where_valid(logprobs_BT - behav_logprobs_BT, mask_BT).detach())
    loss_BT = _weighted(0.5 * weight_BT * log_ratio_BT.square(), weights_BT)
    loss = masked_sum(loss_BT, mask_BT) / num_tokens
    return loss, {"loss/kd": loss.item(), **kd_metrics(log_ratio_BT.detach(), mask_BT, num_tokens)}


def kd_seed_k1_loss(
    logprobs_BT: Tensor,
    behav_logprobs_BT: Tensor,
    teacher_logprobs_BT: Tensor,
    mask_BT: Tensor,
    *,
    discount: float = 0.0,
    eps_clip: float | None = None,
    weights_BT: Tensor | None = None,
    num_tokens: float,
) -> tuple[Tensor, KDMetrics]:
    """The reference's joint-loss term ``mean(log q - log p_T)``; zero expected gradient."""
    check_num_tokens(num_tokens)
    if discount != 0.0:
        raise ValueError(f"seed_k1 is a per-token term: discount must be 0, got {discount}")
    log_ratio_BT = where_valid(logprobs_BT - teacher_logprobs_BT.detach(), mask_BT)
    loss = masked_sum(_weighted(log_ratio_BT, weights_BT), mask_BT) / num_tokens
    return loss, {"loss/kd": loss.item(), **kd_metrics(log_ratio_BT.detach(), mask_BT, num_tokens)}


SampledKDLoss = Callable[..., tuple[Tensor, KDMetrics]]

SAMPLED_KD_LOSSES: dict[str, SampledKDLoss] = {
    "pg": kd_pg_loss,
    "k2": kd_k2_loss,
    "seed_k1": kd_seed_k1_loss,
}
"""Sampled-token distillation losses by ``teacher.kd_estimator`` name."""
