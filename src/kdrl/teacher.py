"""Teacher scoring: the teacher's log-probs of the student's sampled tokens.

Shape legend: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``K`` top-k, ``C`` candidate
ids per position. Outputs are aligned with ``RolloutBatch.input_ids_BT``: position ``t`` holds
``log p_T(x_t | x_<t)``, read from the teacher's logits at position ``t - 1`` (the prediction
position). Off-response positions hold 0 and are masked by the loss.

The :class:`Teacher` protocol is the seam for a teacher in another process or machine
(:mod:`kdrl.teacher_http` for ``kdrl serve-teacher``, :mod:`kdrl.teacher_openai` for ``vllm
serve``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdrl import stop
from kdrl.forward import response_window, window_logits
from kdrl.fused import (
    default_chunk_rows,
    fused_eligible,
    output_head,
    window_hidden,
    window_token_logprobs,
)
from kdrl.logprobs import _compute_dtype
from kdrl.microbatch import token_budget_microbatches
from kdrl.rollout import RolloutBatch


@dataclass
class TeacherOutput:
    logprobs_BT: Tensor
    """Teacher log-prob of each sampled response token (float32)."""
    topk_logprobs_BTK: Tensor | None = None
    """Teacher's top-k log-probs per response position (normalised over the whole vocabulary)."""
    topk_ids_BTK: Tensor | None = None
    """The ids of ``topk_logprobs_BTK``. For the full distribution (``top_k >= V``) a local
    teacher gives ``arange(V)`` broadcast to every position: a read-only view, no memory."""
    candidate_logprobs_BTC: Tensor | None = None
    """Teacher log-probs of the ids asked for in ``candidate_ids_BTC`` (normalised over the whole
    vocabulary, float32; 0 off response positions)."""


class Teacher(Protocol):
    def score(
        self, batch: RolloutBatch, *, top_k: int = 0, candidate_ids_BTC: Tensor | None = None
    ) -> TeacherOutput:
        """Log-probs of the sampled tokens; with ``top_k > 0`` also the top-k distribution
        (``top_k >= V`` gives the full distribution); with ``candidate_ids_BTC`` (int64,
        ``[B, T, C]`` aligned with ``input_ids_BT``, read at response positions only) also the
        log-probs of exactly those ids, e.g. the student's own top-k, so a divergence can be
        taken on the student's support without shipping the teacher's whole distribution."""
        ...


def check_candidate_ids(batch: RolloutBatch, candidate_ids_BTC: Tensor, vocab: int) -> None:
    """``ValueError`` naming the first row and position whose candidate ids are unusable.

    Only response positions are read, so callers may leave anything (e.g. -1) elsewhere.
    """
    shape = tuple(candidate_ids_BTC.shape)
    if candidate_ids_BTC.dim() != 3 or shape[:2] != tuple(batch.input_ids_BT.shape):
        raise ValueError(
            f"candidate_ids_BTC must be [B, T, C] = [{batch.num_sequences}, "
            f"{batch.input_ids_BT.shape[1]}, C], got {list(shape)}"
        )
    dtype = candidate_ids_BTC.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool or shape[2] < 1:
        raise ValueError(f"candidate_ids_BTC must hold C >= 1 integer ids, got {shape} {dtype}")
    bad_BT = ((candidate_ids_BTC < 0) | (candidate_ids_BTC >= vocab)).any(-1)
    bad_BT &= batch.response_mask_BT
    if bad_BT.any():
        row, pos = (int(i) for i in bad_BT.nonzero()[0])
        raise ValueError(
            f"candidate_ids_BTC row {row} position {pos}: ids must lie in [0, {vocab}), got "
            f"{candidate_ids_BTC[row, pos].tolist()}"
        )


class LocalTeacher:
    """A frozen Hugging Face model in this process, run in token-budget micro-batches."""

    def __init__(
        self, model: PreTrainedModel, *, temperature: float, max_tokens_per_mb: int, vocab: int
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"teacher.temperature must be > 0, got {temperature}")
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens_per_mb
        # Ids past the student's vocabulary (padded rows of a larger teacher) are never sampled;
        # the teacher's distribution is renormalised over the ids the student has.
        self.vocab = vocab

    def score(
        self, batch: RolloutBatch, *, top_k: int = 0, candidate_ids_BTC: Tensor | None = None
    ) -> TeacherOutput:
        b, t = batch.input_ids_BT.shape
        logp_BT = torch.zeros(b, t, dtype=torch.float32)
        k = min(top_k, self.vocab)
        topk_lp = torch.zeros(b, t, k, dtype=torch.float32) if k else None
        full = k == self.vocab  # every id, in id order: nothing to sort, no ids to store
        topk_ids = None
        if k:
            topk_ids = (
                torch.arange(k).expand(b, t, k) if full else torch.zeros(b, t, k, dtype=torch.long)
            )
        cand_lp = None
        if candidate_ids_BTC is not None:
            check_candidate_ids(batch, candidate_ids_BTC, self.vocab)
            # Off-response entries may be anything; clamp them so the gather stays in range.
            candidate_ids_BTC = candidate_ids_BTC.long().clamp(0, self.vocab - 1)
            cand_lp = torch.zeros(candidate_ids_BTC.shape, dtype=torch.float32)
        lengths = batch.attention_mask_BT.sum(1).tolist()
        # The sampled tokens alone need no [B, T, V] logits (`kdrl.fused`); the top-k and the
        # candidates read the whole distribution, one chunk of positions at a time.
        fused = not k and cand_lp is None and fused_eligible(self.model)
        # The outputs are ordinary tensors (a loss may read views of them under autograd);
        # only the teacher's own work runs in inference mode.
        with torch.inference_mode():
            for rows in token_budget_microbatches(lengths, self.max_tokens):
                stop.abandon_point()  # a stop request drops the step before its update
                window = response_window(batch, rows)
                if fused:
                    lp, _ = window_token_logprobs(
                        self.model, batch, window, temperature=self.temperature, vocab=self.vocab
                    )
                    logp_BT[rows, window.start : window.stop] = lp.cpu()
                    continue
                for bt, x_CV, ids_C in self._distribution_chunks(batch, window):
                    # Scaled logit minus logsumexp (token_logprobs' arithmetic) for the sampled
                    # token and the candidates alike: a candidate equal to the sampled token gets
                    # exactly logprobs_BT's value.
                    lse_C1 = x_CV.logsumexp(-1, keepdim=True)
                    logp_BT[bt] = (x_CV.gather(-1, ids_C[:, None]) - lse_C1).squeeze(-1).cpu()
                    if cand_lp is not None:
                        cand = candidate_ids_BTC[bt].to(x_CV.device)
                        cand_lp[bt] = (x_CV.gather(-1, cand) - lse_C1).cpu()
                    if k:
                        dist_CV = x_CV.sub_(lse_C1)
                        if full:
                            topk_lp[bt] = dist_CV.cpu()
                        else:
                            values, idx = dist_CV.topk(k, dim=-1)
                            topk_lp[bt], topk_ids[bt] = values.cpu(), idx.cpu()
        resp = batch.response_mask_BT
        logp_BT = torch.where(resp, logp_BT, 0.0)
        if cand_lp is not None:
            cand_lp = torch.where(resp[..., None], cand_lp, 0.0)
        if topk_lp is not None and topk_ids is not None:  # as the module says: 0 off responses
            # In place: at V = 150k a copy of the [B, T, V] top-k is gigabytes.
            topk_lp.masked_fill_(~resp[..., None], 0.0)
            if not full:
                topk_ids.masked_fill_(~resp[..., None], 0)
        return TeacherOutput(logp_BT, topk_lp, topk_ids, cand_lp)

    def _distribution_chunks(self, batch: RolloutBatch, window):
        """The window's positions a chunk at a time: ``((b, t), x_CV, ids_C)`` with ``b, t`` the
        batch coordinates of the chunk's ``C`` positions, ``x_CV`` their teacher logits over
        the student's ids divided by the temperature (float32, a fresh tensor) and ``ids_C``
        the tokens they predict. A `fused_eligible` teacher projects its final hidden states
        chunk by chunk, so no ``[tokens, V]`` logits exist; otherwise its logits are sliced."""
        if fused_eligible(self.model):
            source_BWX = window_hidden(self.model, batch, window)
            head = output_head(self.model, self.vocab)
        else:
            source_BWX, head = window_logits(self.model, batch, window)[..., : self.vocab], None
        r, w = source_BWX.shape[:2]
        source_NX = source_BWX.reshape(r * w, -1)
        device = source_NX.device
        b_N = torch.tensor(window.rows).repeat_interleave(w)
        t_N = torch.arange(window.start, window.stop).repeat(r)
        ids_N = window.take(batch.input_ids_BT, device).reshape(-1)
        step = default_chunk_rows(self.vocab, device)
        for s in range(0, r * w, step):
            c = slice(s, s + step)
            x_CV = source_NX[c] if head is None else head(source_NX[c])
            x_CV = x_CV.to(_compute_dtype(x_CV.dtype)) / self.temperature
            yield (b_N[c], t_N[c]), x_CV, ids_N[c]
