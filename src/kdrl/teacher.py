"""Teacher scoring: the teacher's log-probs of the student's sampled tokens.

Shape legend: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``K`` top-k. Outputs are
aligned with ``RolloutBatch.input_ids_BT``: position ``t`` holds ``log p_T(x_t | x_<t)``, read
from the teacher's logits at position ``t - 1`` (the prediction position). Off-response
positions hold 0 and are masked by the loss.

The :class:`Teacher` protocol is the seam for a teacher in another process or machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdrl.forward import response_window, window_logits
from kdrl.logprobs import token_logprobs
from kdrl.microbatch import token_budget_microbatches
from kdrl.rollout import RolloutBatch


@dataclass
class TeacherOutput:
    logprobs_BT: Tensor
    """Teacher log-prob of each sampled response token (float32)."""
    topk_logprobs_BTK: Tensor | None = None
    """Teacher's top-k log-probs per response position (normalised over the whole vocabulary)."""
    topk_ids_BTK: Tensor | None = None
    """The ids of ``topk_logprobs_BTK``."""


class Teacher(Protocol):
    def score(self, batch: RolloutBatch, *, top_k: int) -> TeacherOutput:
        """Log-probs of the sampled tokens; with ``top_k > 0`` also the top-k distribution
        (``top_k >= V`` gives the full distribution)."""
        ...


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

    @torch.inference_mode()
    def score(self, batch: RolloutBatch, *, top_k: int = 0) -> TeacherOutput:
        b, t = batch.input_ids_BT.shape
        logp_BT = torch.zeros(b, t, dtype=torch.float32)
        k = min(top_k, self.vocab)
        topk_lp = torch.zeros(b, t, k, dtype=torch.float32) if k else None
        topk_ids = torch.zeros(b, t, k, dtype=torch.long) if k else None
        lengths = batch.attention_mask_BT.sum(1).tolist()
        for rows in token_budget_microbatches(lengths, self.max_tokens):
            window = response_window(batch, rows)
            logits = window_logits(self.model, batch, window)[..., : self.vocab]
            ids = window.take(batch.input_ids_BT, logits.device)
            lp, _ = token_logprobs(logits, ids, temperature=self.temperature)
            span = (rows, slice(window.start, window.stop))
            logp_BT[span] = lp.cpu()
            if k:
                dist = (logits.float() / self.temperature).log_softmax(-1)
                values, idx = dist.topk(k, dim=-1) if k < self.vocab else (dist, None)
                topk_lp[span] = values.cpu()
                topk_ids[span] = idx.cpu() if idx is not None else torch.arange(k)
        resp = batch.response_mask_BT
        logp_BT = torch.where(resp, logp_BT, 0.0)
        return TeacherOutput(logp_BT, topk_lp, topk_ids)
