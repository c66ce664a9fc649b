"""Full-distribution divergences between teacher and student at each sampled position.

Shape legend: ``N`` token positions, ``V`` vocabulary, ``K`` teacher top-k, ``C`` rows of a chunk.
``P`` is the teacher's next-token distribution, ``Q`` the student's, both over the same ids.

* ``forward_kl``: ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)`` (mass-covering).
* ``reverse_kl``: ``KL(Q || P)`` (mode-seeking).
* ``jsd`` (generalized Jensen-Shannon, GKD, arXiv 2306.13649, in TRL's convention):
  ``M = beta P + (1 - beta) Q``, ``JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)``.
  ``beta = 0`` and ``beta = 1`` are *defined* as ``forward_kl`` and ``reverse_kl`` exactly
  (the interior values tend to 0 at both ends; ``JSD_beta / (beta (1 - beta))`` tends to them).

Top-k: when the teacher gives only its ``K`` most likely ids, both distributions are reduced to
``K + 1`` outcomes, the ``K`` ids and one tail bucket holding the rest of the mass. With
``K = V`` this is the full divergence.

Optional per-position ``weights`` (reward-guided masking) multiply each divergence.

Rows are processed ``C`` at a time under activation checkpointing, so no float32 ``[N, V]``
temporary exists in the forward or the backward pass beyond the inputs themselves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdrl.logprobs import DEFAULT_CHUNK_ELEMENTS, _compute_dtype
from kdrl.masking import check_num_tokens

# The teacher's tail mass is unknown below float resolution; flooring it keeps reverse KL
# finite when the top-k covers (numerically) all of the teacher's mass.
_TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """``KL(a || b)`` over the last dim from log-probs; ``0 log 0 = 0`` with finite gradients."""
    has_mass = logp_a > -math.inf
    la = torch.where(has_mass, logp_a, 0.0)
    lb = torch.where(has_mass, logp_b, 0.0)
    return torch.where(has_mass, la.exp() * (la - lb), 0.0).sum(-1)


def generalized_jsd(teacher_logp: Tensor, student_logp: Tensor, *, beta: float) -> Tensor:
    """``JSD_beta(P, Q)`` per row from log-probs ``[..., V]``; exact KLs at ``beta`` 0 and 1."""
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, m) + (1.0 - beta) * _kl(student_logp, m)


DIVERGENCES: dict[str, float | None] = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}
"""Full-distribution divergences by ``teacher.kd_estimator`` name: each is the generalized JSD
at a fixed ``beta`` (``None``: the configured ``jsd_beta``)."""


def divergence(teacher_logp: Tensor, student_logp: Tensor, *, kind: str, beta: float) -> Tensor:
    """Divergence ``kind`` per row between two distributions given as log-probs ``[..., V]``."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {sorted(DIVERGENCES)}")
    fixed = DIVERGENCES[kind]
    return generalized_jsd(teacher_logp, student_logp, beta=beta if fixed is None else fixed)


def _full_chunk(s_CV: Tensor, t_CV: Tensor, valid_C: Tensor, s_temp, t_temp, kind, beta) -> Tensor:
    cd = _compute_dtype(s_CV.dtype)
    s_logp = torch.log_softmax(s_CV.to(cd) / s_temp, dim=-1)
    # Masked rows may hold -inf teacher logits: replace them before any arithmetic.
    t_CV = torch.where(valid_C[:, None], t_CV.to(cd), 0.0)
    t_logp = torch.log_softmax(t_CV / t_temp, dim=-1)
    return torch.where(valid_C, divergence(t_logp, s_logp, kind=kind, beta=beta), 0.0)


def _topk_chunk(s_CV: Tensor, t_CK: Tensor, ids_CK: Tensor, valid_C: Tensor, s_temp, kind, beta):
    cd = _compute_dtype(s_CV.dtype)
    x_CV = s_CV.to(cd) / s_temp
    lse_C = torch.logsumexp(x_CV, dim=-1, keepdim=True)
    s_CK = x_CV.gather(1, ids_CK) - lse_C
    t_CK = torch.where(valid_C[:, None], t_CK.to(cd), -1.0)
    if ids_CK.shape[1] < s_CV.shape[1]:
        s_tail = torch.logsumexp(x_CV.scatter(1, ids_CK, -math.inf), -1, keepdim=True) - lse_C
        t_mass = torch.logsumexp(t_CK, -1, keepdim=True).clamp(max=0.0)
        t_tail = torch.log(-torch.expm1(t_mass)).clamp(min=_TAIL_FLOOR)
        s_CK, t_CK = torch.cat([s_CK, s_tail], -1), torch.cat([t_CK, t_tail], -1)
    return torch.where(valid_C, divergence(t_CK, s_CK, kind=kind, beta=beta), 0.0)


def _is_every_id(ids_NK: Tensor, v: int) -> bool:
    """Whether every row of ``ids_NK`` is ``0 .. v - 1`` in order, as a broadcast view (how a
    local teacher gives the full distribution); cheap: only such views are checked."""
    if ids_NK.shape[-1] != v or ids_NK.numel() == 0:
        return False
    flat = ids_NK.reshape(-1, v)
    return flat.stride(0) == 0 and torch.equal(flat[0], torch.arange(v, device=flat.device))


def _all_ids_chunk(s_CV: Tensor, t_CV: Tensor, valid_C: Tensor, s_temp, kind, beta) -> Tensor:
    """`_topk_chunk` with ``K = V`` ids in id order: the student's log-probs need no gather."""
    cd = _compute_dtype(s_CV.dtype)
    s_logp = torch.log_softmax(s_CV.to(cd) / s_temp, dim=-1)
    t_CV = torch.where(valid_C[:, None], t_CV.to(cd), -1.0)
    return torch.where(valid_C, divergence(t_CV, s_logp, kind=kind, beta=beta), 0.0)


def _chunked_sum(
    fn, tensors: list[Tensor], v: int, chunk_rows: int | None, weights: Tensor | None
) -> Tensor:
    rows = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // v)
    lead = tensors[-1].shape  # the mask: every input shares its leading dims
    tensors = [x.reshape(lead.numel(), *x.shape[len(lead) :]) for x in tensors]
    n = lead.numel()
    w = None if weights is None else weights.detach().reshape(n)
    total = tensors[0].new_zeros((), dtype=_compute_dtype(tensors[0].dtype))
    for s in range(0, n, rows):
        parts = [x[s : s + rows] for x in tensors]
        if torch.is_grad_enabled() and tensors[0].requires_grad:
            d = checkpoint(fn, *parts, use_reentrant=False)
        else:
            d = fn(*parts)
        total = total + (d if w is None else d * w[s : s + rows]).sum()
    return total


def full_divergence_loss(
    student_logits_NV: Tensor,
    teacher_logits_NV: Tensor,
    mask_N: Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    student_temperature: float,
    teacher_temperature: float,
    num_tokens: float,
    weights: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``sum_valid D(P_T, Q) / num_tokens`` with full teacher logits ``[..., V]`` and a mask of
    the leading shape. A teacher vocabulary
    padded beyond the student's (e.g. 152,064 vs 151,936 rows) is cut to the student's ids."""
    check_num_tokens(num_tokens)
    v = student_logits_NV.shape[-1]
    if teacher_logits_NV.shape[-1] < v:
        raise ValueError(
            f"teacher vocabulary ({teacher_logits_NV.shape[-1]}) is smaller than "
            f"the student's ({v})"
        )
    teacher_NV = teacher_logits_NV[..., :v].detach()

    def fn(s, t, m):
        return _full_chunk(s, t, m, student_temperature, teacher_temperature, kind, beta)

    total = _chunked_sum(fn, [student_logits_NV, teacher_NV, mask_N], v, chunk_rows, weights)
    return total / num_tokens


def topk_divergence_loss(
    student_logits_NV: Tensor,
    teacher_topk_logprobs_NK: Tensor,
    teacher_topk_ids_NK: Tensor,
    mask_N: Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    student_temperature: float,
    num_tokens: float,
    weights: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``sum_valid D / num_tokens`` over the teacher's top-k ids plus a tail bucket. The teacher's
    log-probs must already be at the teacher's temperature (they are normalised over all V)."""
    check_num_tokens(num_tokens)
    v = student_logits_NV.shape[-1]
    ids_NK = teacher_topk_ids_NK.long()
    if _is_every_id(ids_NK, v):  # the full distribution in id order: no gather needed

        def full(s, t, m):
            return _all_ids_chunk(s, t, m, student_temperature, kind, beta)

        tensors = [student_logits_NV, teacher_topk_logprobs_NK.detach(), mask_N]
        return _chunked_sum(full, tensors, v, chunk_rows, weights) / num_tokens

    def fn(s, t, i, m):
        return _topk_chunk(s, t, i, m, student_temperature, kind, beta)

    tensors = [student_logits_NV, teacher_topk_logprobs_NK.detach(), ids_NK, mask_N]
    return _chunked_sum(fn, tensors, v, chunk_rows, weights) / num_tokens
