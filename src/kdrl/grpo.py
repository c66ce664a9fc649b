"""GRPO: group-normalised advantages and the PPO clipped surrogate.

Shape legend: ``P`` prompts, ``G`` samples per prompt, ``B = P * G`` sequences, ``T`` tokens.

References: GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300); PPO (Schulman et al. 2017,
arXiv 1707.06347); dual clip (Ye et al. 2020, arXiv 1912.09729); decoupled upper clip
(DAPO, arXiv 2503.14476).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdrl.masking import check_num_tokens, masked_sum, where_valid


def group_advantages(
    rewards_PG: Tensor,
    *,
    reward_scaling: float = 1.0,
    reward_bias: float = 0.0,
    std_norm: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages ``A = (r' - mean_G r') / (std_G r' + eps)``, ``r' = (r + bias) *
    scaling``; without ``std_norm`` only the group mean is subtracted. The standard deviation is
    the population one (a single-sample group gets advantage 0, not ``nan``)."""
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {tuple(rewards_PG.shape)}")
    r_PG = (rewards_PG.double() + reward_bias) * reward_scaling
    adv_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if std_norm:
        adv_PG = adv_PG / (r_PG.std(dim=1, keepdim=True, correction=0) + eps)
    return adv_PG.to(torch.float32)


def ppo_policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    num_tokens: float,
) -> tuple[Tensor, dict[str, float]]:
    """Token-mean PPO clipped surrogate.

    ``rho = exp(logp - logp_old)``; per token ``l = max(-A rho, -A clip(rho, 1 - eps_clip,
    1 + eps_clip_higher))``; with dual clip, ``l = min(l, -c_clip A)`` where ``A < 0``.
    Returns ``sum_valid(l) / num_tokens``. On-policy (``rho = 1``) its gradient is
    ``-sum_t A_t grad log pi(x_t) / num_tokens``, the REINFORCE gradient with baseline.
    """
    check_num_tokens(num_tokens)
    hi = eps_clip if eps_clip_higher is None else eps_clip_higher
    log_ratio_BT = where_valid(logprobs_BT - old_logprobs_BT.detach(), mask_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = where_valid(advantages_BT.detach(), mask_BT)
    loss_BT = torch.maximum(-adv_BT * ratio_BT, -adv_BT * ratio_BT.clamp(1.0 - eps_clip, 1.0 + hi))
    clipped_BT = (-adv_BT * ratio_BT) < loss_BT
    if c_clip is not None:
        if c_clip <= 1.0:
            raise ValueError(f"c_clip must be > 1, got {c_clip}")
        dual_BT = torch.minimum(loss_BT, -adv_BT * c_clip)
        loss_BT = torch.where(adv_BT < 0, dual_BT, loss_BT)
    loss = masked_sum(loss_BT, mask_BT) / num_tokens
    with torch.no_grad():
        metrics = {
            "loss/grpo": loss.item(),
            "grpo/clip_frac": masked_sum(clipped_BT.float(), mask_BT).item() / num_tokens,
            "grpo/ratio_mean": masked_sum(ratio_BT, mask_BT).item() / num_tokens,
        }
    return loss, metrics


def sequence_to_tokens(values_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Broadcast one value per sequence (an advantage) to each of its tokens."""
    return values_B[:, None].expand_as(mask_BT).to(torch.float32)
