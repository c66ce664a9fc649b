"""Token log-probs straight from the final hidden states: the vocabulary projection is fused
with the log-softmax, so no ``[tokens, V]`` logits tensor is ever built.

Shape legend: ``B`` sequences, ``W`` positions of a response window, ``N`` flattened positions,
``H`` hidden size, ``V`` vocabulary (rows of the output embedding), ``C`` rows of one chunk,
``S`` rows of a slice of a chunk.

`kdrl.logprobs.token_logprobs` already bounds the memory of the log-softmax, but its input, the
logits the model's ``lm_head`` returns, is itself ``[B, W, V]`` (float32: 2.5 GB for 4,096
positions and Qwen's 151,936 ids), and autograd keeps a gradient of the same size. Here the
model's forward stops short of its ``lm_head`` (`window_hidden`), and `fused_token_logprobs`
multiplies ``C`` rows of hidden states by the output embedding at a time, recomputing each
chunk's logits in the backward pass instead of storing them. Memory beyond the hidden states is
``O(C x V)``; the price is one more ``[N, H] x [H, V]`` product in the backward pass.

The result is the same function as ``token_logprobs(lm_head(hidden))`` (tests compare values and
gradients), so it is only used where that is exactly what the model computes (`fused_eligible`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdrl.distributed import is_sharded, unwrap
from kdrl.forward import Window
from kdrl.rollout import RolloutBatch

CPU_CHUNK_ELEMENTS = 1 << 24
"""Logit elements per chunk on the CPU (64 MiB in float32)."""
GPU_CHUNK_ELEMENTS = 1 << 26
"""Logit elements per chunk on an accelerator (256 MiB in float32): every chunk reads the whole
output embedding again, so chunks must hold a few hundred rows for the product to be bound by
arithmetic rather than by memory bandwidth."""

SUB_BLOCKS = 8
"""Slices of a chunk's rows the element-wise work runs on, one at a time: its temporaries are
``[C / SUB_BLOCKS, V]`` beside the chunk's one ``[C, V]`` buffer."""

FUSED_MODEL_TYPES = frozenset(
    {
        "deepseek_v3", "gemma", "glm4", "llama", "ministral", "mistral", "olmo2", "phi3",
        "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
    }
)  # fmt: skip
"""Architectures whose logits are exactly ``lm_head(final_hidden[:, -logits_to_keep:])`` in
transformers 5.19 (read in their ``*ForCausalLM.forward``; `tests/test_fused.py` checks each on a
tiny random model). Others (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's
soft-capping, remote code) keep the materialised path."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
"""Config fields that, where an architecture reads them, change the logits after ``lm_head``."""


def why_not_fused(model: torch.nn.Module) -> str | None:
    """Why the fused path would not compute exactly the model's own log-probs, or None when it
    does. ``model`` may be wrapped in DDP."""
    inner = unwrap(model)
    if is_sharded(model) or is_sharded(inner):
        return "FSDP2-sharded model (the output embedding is a shard)"
    config = getattr(inner, "config", None)
    configs = [config, config.get_text_config()] if config is not None else []
    for cfg in configs:
        for name in LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1:
                return f"config.{name} = {value} transforms the logits after the lm_head"
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose logits are known to be lm_head(hidden)"
    if not type(inner).__module__.startswith("transformers.models."):
        return f"{type(inner).__name__} is not transformers' own class (remote or custom code)"
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    # Exactly nn.Linear: subclasses (quantised layers) and adapters (LoRA) compute something else.
    if type(head) is not torch.nn.Linear:
        return f"output embedding is {type(head).__name__}, not a plain torch.nn.Linear"
    if head.bias is not None:
        return "the lm_head has a bias"
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return "the lm_head has hooks (device placement or offloading) that may change its output"
    weight = head.weight
    if weight.device.type == "meta" or type(weight.data) is not torch.Tensor:
        return "the lm_head weight is not a plain local tensor (offloaded or tensor-parallel)"
    return None


def fused_eligible(model: torch.nn.Module) -> bool:
    """True when `window_token_logprobs` equals ``token_logprobs`` of the model's own logits
    (`why_not_fused` says why not)."""
    return why_not_fused(model) is None


def window_hidden(model: torch.nn.Module, batch: RolloutBatch, window: Window) -> Tensor:
    """Final (normed) hidden states ``[len(rows), W, H]`` at the positions that predict the
    window's tokens: the rows `kdrl.forward.window_logits` would project to logits.

    The model runs its ordinary forward (so DDP, hooks and gradient checkpointing behave as
    usual) with ``logits_to_keep`` as in ``window_logits``; a pre-hook on the output embedding
    takes the hidden states it is handed and passes it an empty slice instead, so the
    vocabulary projection costs nothing and the returned logits are ``[len(rows), 0, V]``.
    The hidden states stay in the autograd graph of the decoder.
    """
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    captured: list[Tensor] = []

    def take_input(module, args, kwargs):
        x_BKH = args[0] if args else kwargs.pop("input")
        captured.append(x_BKH)
        return (x_BKH[:, :0],), kwargs

    device = next(inner.parameters()).device
    ids = batch.input_ids_BT[window.rows, : window.stop].to(device)
    attn = batch.attention_mask_BT[window.rows, : window.stop].to(device)
    keep = window.stop - window.start + 1  # positions start-1 .. stop-1; the last predicts nothing
    handle = head.register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=attn, logits_to_keep=keep)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].shape[1] != keep:
        raise RuntimeError(
            f"expected one lm_head call on {keep} positions, got "
            f"{[tuple(x.shape) for x in captured]}"
        )
    return captured[0][:, :-1]


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with float32 accumulation and result for half-precision inputs (float32 and
    float64 stay as they are). On CUDA the product keeps bf16/fp16 operands and only widens the
    output; elsewhere the half-precision product is upcast, as the model's own lm_head would."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a build or device without the widening product
            pass
    return (a @ b).float()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FusedTokenLogProbs(torch.autograd.Function):
    """Forward: per chunk of rows, logits = hidden @ weight.T / T, then log p(ids) and entropy.
    Saves hidden, ids and the per-row log-normaliser (and entropy); the backward recomputes each
    chunk's logits and turns their gradient into gradients of hidden and weight.

    A chunk holds one ``[C, V]`` buffer, the product (wide, for an efficient matmul); the
    element-wise work on it runs on ``SUB_BLOCKS`` slices of rows at a time, in place, so its
    temporaries are ``[C / SUB_BLOCKS, V]``. The buffer is released before the next product."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_N, temperature, vocab, chunk_rows, with_entropy):  # type: ignore[override]
        n = hidden_NH.shape[0]
        cd = _compute_dtype(hidden_NH.dtype)
        w_VH = weight_VH[:vocab]
        logp_N = torch.empty(n, dtype=cd, device=hidden_NH.device)
        lse_N = torch.empty(n, dtype=cd, device=hidden_NH.device)
        ent_N = torch.empty(n if with_entropy else 0, dtype=cd, device=hidden_NH.device)
        for s in range(0, n, chunk_rows):
            rows = slice(s, s + chunk_rows)
            x_CV = _mm(hidden_NH[rows], w_VH.T).to(cd).div_(temperature)
            ent_C = ent_N[rows] if with_entropy else None
            _chunk_forward(x_CV, ids_N[rows], lse_N[rows], logp_N[rows], ent_C)
            del x_CV
        ctx.save_for_backward(hidden_NH, weight_VH, ids_N, lse_N, ent_N)
        ctx.temperature, ctx.vocab, ctx.chunk_rows = temperature, vocab, chunk_rows
        ctx.set_materialize_grads(False)
        return logp_N, ent_N

    @staticmethod
    def backward(ctx, g_logp_N, g_ent_N):  # type: ignore[override]
        hidden_NH, weight_VH, ids_N, lse_N, ent_N = ctx.saved_tensors
        t, chunk_rows, vocab = ctx.temperature, ctx.chunk_rows, ctx.vocab
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        use_ent = g_ent_N is not None and ent_N.numel() > 0
        if g_logp_N is None and not use_ent:
            return None, None, None, None, None, None, None
        cd = lse_N.dtype
        g_logp_N = g_logp_N.to(cd) if g_logp_N is not None else None
        g_ent_N = g_ent_N.to(cd) if use_ent else None
        w_VH = weight_VH[:vocab]
        grad_NH = torch.empty_like(hidden_NH) if want_hidden else None
        # One accumulator over all chunks, float32 (float64) whatever the weight's dtype; for a
        # float32 (float64) weight it is the returned gradient itself (rows past vocab stay 0).
        grad_weight = grad_VH = None
        if want_weight:
            grad_weight = torch.zeros(weight_VH.shape, dtype=cd, device=weight_VH.device)
            grad_VH = grad_weight[:vocab]
        for s in range(0, hidden_NH.shape[0], chunk_rows):
            rows = slice(s, s + chunk_rows)
            h_CH = hidden_NH[rows]
            logq_CV = _mm(h_CH, w_VH.T).to(cd).div_(t).sub_(lse_N[rows, None])
            g_CV = _chunk_logit_grad(
                logq_CV,
                ids_N[rows],
                ent_N[rows] if use_ent else None,
                g_logp_N[rows] if g_logp_N is not None else None,
                g_ent_N[rows] if g_ent_N is not None else None,
            ).div_(t)
            del logq_CV
            g_CV = g_CV.to(w_VH.dtype)  # d/d logits, in the dtype the lm_head would see
            if grad_NH is not None:
                grad_NH[rows] = _mm(g_CV, w_VH).to(grad_NH.dtype)
            if grad_VH is not None:
                if g_CV.dtype == cd:
                    grad_VH.addmm_(g_CV.T, h_CH.to(cd))
                else:
                    grad_VH += _mm(g_CV.T, h_CH)
            del g_CV
        del grad_VH
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VH.dtype)
        return grad_NH, grad_weight, None, None, None, None, None


def _row_blocks(n: int) -> list[slice]:
    sub = max(1, -(-n // SUB_BLOCKS))
    return [slice(a, a + sub) for a in range(0, n, sub)]


def _chunk_forward(x_CV, ids_C, lse_C, logp_C, ent_C) -> None:
    """Fill ``lse_C``, ``logp_C`` (and ``ent_C``) from the scaled logits ``x_CV`` (clobbered)."""
    for r in _row_blocks(x_CV.shape[0]):
        x_SV = x_CV[r]
        lse_S = torch.logsumexp(x_SV, dim=-1)
        lse_C[r] = lse_S
        logp_C[r] = x_SV.gather(1, ids_C[r, None]).squeeze(1) - lse_S
        if ent_C is not None:
            logq_SV = x_SV.sub_(lse_S[:, None])
            ent_C[r] = -(logq_SV.exp() * logq_SV).sum(-1)


def _chunk_logit_grad(logq_CV, ids_C, ent_C, g_logp_C, g_ent_C) -> Tensor:
    """The gradient with respect to the scaled logits ``x = z / T``, written over ``logq_CV``
    (the chunk's log-probs) and returned:

        d log p_i / d x_j = 1[i == j] - p_j,        dH / dx_j = -p_j (log p_j + H).
    """
    for r in _row_blocks(logq_CV.shape[0]):
        logq_SV = logq_CV[r]
        p_SV = logq_SV.exp()
        if g_ent_C is not None:
            logq_SV.add_(ent_C[r, None]).mul_(p_SV).mul_(-g_ent_C[r, None])
        else:
            logq_SV.zero_()
        if g_logp_C is not None:
            logq_SV.sub_(p_SV.mul_(g_logp_C[r, None]))
    if g_logp_C is not None:
        logq_CV.scatter_add_(1, ids_C[:, None], g_logp_C[:, None])
    return logq_CV


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, elements // vocab)


def fused_token_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    ids_N: Tensor,
    *,
    temperature: float,
    vocab: int | None = None,
    chunk_rows: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``token_logprobs(hidden_NH @ weight_VH[:vocab].T, ids_N, ...)`` without the logits.

    ``hidden_NH`` ``[N, H]`` are final hidden states, ``weight_VH`` ``[V, H]`` the output
    embedding (its first ``vocab`` rows are the distribution's support; None keeps all) and
    ``ids_N`` the token each row predicts. Returns float32 (float64 for float64 input) log-probs
    ``[N]`` and, when asked for, the entropy ``[N]``, else None. Differentiable in ``hidden_NH``
    and ``weight_VH``; memory beyond the inputs is ``O(chunk_rows x vocab)`` plus, in the
    backward pass, a float32 gradient of the weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, h = hidden_NH.shape
    if weight_VH.dim() != 2 or weight_VH.shape[1] != h or ids_N.shape != (n,):
        raise ValueError(
            f"hidden {tuple(hidden_NH.shape)}, weight {tuple(weight_VH.shape)} and ids "
            f"{tuple(ids_N.shape)} must be [N, H], [V, H] and [N]"
        )
    vocab = weight_VH.shape[0] if vocab is None else vocab
    if not 1 <= vocab <= weight_VH.shape[0]:
        raise ValueError(f"vocab must be in [1, {weight_VH.shape[0]}], got {vocab}")
    rows = chunk_rows or default_chunk_rows(vocab, hidden_NH.device)
    logp_N, ent_N = _FusedTokenLogProbs.apply(
        hidden_NH, weight_VH, ids_N.long(), float(temperature), vocab, rows, with_entropy
    )
    return logp_N, ent_N if with_entropy else None


@dataclass
class OutputHead:
    """A `fused_eligible` model's vocabulary projection cut to ``vocab`` ids: what turns final
    hidden states into logits, applied to one chunk of positions at a time."""

    weight_VH: Tensor
    vocab: int

    def __call__(self, hidden_CH: Tensor) -> Tensor:
        return torch.nn.functional.linear(hidden_CH, self.weight_VH[: self.vocab])


def output_head(model: torch.nn.Module, vocab: int | None = None) -> OutputHead:
    weight_VH = unwrap(model).get_output_embeddings().weight
    return OutputHead(weight_VH, weight_VH.shape[0] if vocab is None else vocab)


def window_token_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    window: Window,
    *,
    temperature: float,
    vocab: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[len(rows), W]`` (and entropy) of the window's tokens under the model, equal
    to ``token_logprobs(window_logits(...)[..., :vocab], ...)`` for a `fused_eligible` model."""
    hidden_BWH = window_hidden(model, batch, window)
    weight_VH = unwrap(model).get_output_embeddings().weight
    ids_BW = window.take(batch.input_ids_BT, hidden_BWH.device)
    b, w, h = hidden_BWH.shape
    lp_N, ent_N = fused_token_logprobs(
        hidden_BWH.reshape(b * w, h), weight_VH, ids_BW.reshape(-1),
        temperature=temperature, vocab=vocab, with_entropy=with_entropy,
    )  # fmt: skip
    return lp_N.reshape(b, w), ent_N.reshape(b, w) if ent_N is not None else None
