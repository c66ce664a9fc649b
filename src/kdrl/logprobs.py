"""Per-token log-probabilities (and entropy) from logits, in bounded memory.

Shape legend: ``N`` flattened token positions, ``V`` vocabulary, ``C`` rows of one chunk.

A float32 ``[N, V]`` tensor is never built: rows are processed ``C`` at a time in the forward
pass, and the backward pass recomputes each chunk's softmax instead of storing it. With a
151,936-token vocabulary and 4,096 positions the naive path holds several float32 ``[N, V]``
temporaries (2.5 GB each); this one holds a few ``[C, V]`` chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Float elements per chunk (16 MiB in float32) when no chunk size is given."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast per chunk; float64 stays float64 for reference tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """Forward: log p(ids) and entropy per row. Backward: recompute softmax per chunk."""

    @staticmethod
    def forward(ctx, logits_NV, ids_N, temperature, chunk_rows, with_entropy):  # type: ignore[override]
        n, _ = logits_NV.shape
        cd = _compute_dtype(logits_NV.dtype)
        logp_N = torch.empty(n, dtype=cd, device=logits_NV.device)
        lse_N = torch.empty(n, dtype=cd, device=logits_NV.device)
        ent_N = torch.empty(n if with_entropy else 0, dtype=cd, device=logits_NV.device)
        for s in range(0, n, chunk_rows):
            x_CV = logits_NV[s : s + chunk_rows].to(cd) / temperature
            lse_C = torch.logsumexp(x_CV, dim=-1)
            lse_N[s : s + chunk_rows] = lse_C
            ids_C1 = ids_N[s : s + chunk_rows, None]
            logp_N[s : s + chunk_rows] = x_CV.gather(1, ids_C1).squeeze(1) - lse_C
            if with_entropy:
                logq_CV = x_CV - lse_C[:, None]
                ent_N[s : s + chunk_rows] = -(logq_CV.exp() * logq_CV).sum(-1)
        ctx.save_for_backward(logits_NV, ids_N, lse_N, ent_N)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)
        return logp_N, ent_N

    @staticmethod
    def backward(ctx, g_logp_N, g_ent_N):  # type: ignore[override]
        logits_NV, ids_N, lse_N, ent_N = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.chunk_rows
        cd = lse_N.dtype
        grad_NV = torch.empty_like(logits_NV)
        for s in range(0, logits_NV.shape[0], rows):
            logq_CV = logits_NV[s : s + rows].to(cd) / t - lse_N[s : s + rows, None]
            p_CV = torch.exp(logq_CV)
            g_CV = torch.zeros_like(p_CV)
            if g_logp_N is not None:
                g_C = g_logp_N[s : s + rows].to(cd)
                # d log p_i / d x_j = 1[i == j] - p_j
                g_CV -= p_CV * g_C[:, None]
                g_CV.scatter_add_(1, ids_N[s : s + rows, None], g_C[:, None])
            if g_ent_N is not None and ent_N.numel() > 0:
                g_C = g_ent_N[s : s + rows].to(cd)
                # dH / dx_j = -p_j (log p_j + H)
                g_CV -= p_CV * (logq_CV + ent_N[s : s + rows, None]) * g_C[:, None]
            grad_NV[s : s + rows] = (g_CV / t).to(logits_NV.dtype)
        return grad_NV, None, None, None, None


def token_logprobs(
    logits: Tensor,
    ids: Tensor,
    *,
    temperature: float,
    with_entropy: bool = False,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of ``ids`` under ``softmax(logits / temperature)``, and its entropy.

    ``logits`` is ``[..., V]`` and ``ids`` the matching ``[...]`` (already aligned: row ``i``
    of ``logits`` predicts ``ids[i]``). Returns float32 (float64 for float64 input) tensors of
    the leading shape: log-probs, and the entropy ``H = -sum_v p_v log p_v`` when asked for,
    else ``None``. Differentiable in ``logits``; memory beyond the input is ``O(chunk x V)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    lead, v = ids.shape, logits.shape[-1]
    rows = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // v)
    logp_N, ent_N = _ChunkedTokenLogProbs.apply(
        logits.reshape(-1, v), ids.reshape(-1).long(), float(temperature), rows, with_entropy
    )
    return logp_N.reshape(lead), ent_N.reshape(lead) if with_entropy else None
