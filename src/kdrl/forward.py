"""Forward passes that compute logits only where they are needed: at the positions that
predict response tokens. The prompt's positions still run through the decoder, but skip the
vocabulary projection, which dominates small models with large vocabularies.

Shape legend: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``W`` positions of a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdrl.rollout import RolloutBatch


@dataclass
class Window:
    """Rows of a batch and the token positions ``start .. stop - 1`` that hold every response
    token of those rows (``start >= 1``: a token is predicted by the position before it)."""

    rows: list[int]
    start: int
    stop: int

    def take(self, x_BT: Tensor, device: torch.device | None = None) -> Tensor:
        """``x`` for these rows and positions, ``[len(rows), W, ...]``."""
        # A view where one exists: at V = 150k, a gathered copy of the teacher's [B, T, V]
        # distribution would be gigabytes.
        first, n = self.rows[0], len(self.rows)
        if x_BT.stride(0) == 0:  # broadcast over rows (e.g. the full top-k's ids)
            out = x_BT[:n, self.start : self.stop]
        elif self.rows == list(range(first, first + n)):
            out = x_BT[first : first + n, self.start : self.stop]
        else:
            out = x_BT[self.rows, self.start : self.stop]
        return out if device is None else out.to(device)


def response_window(batch: RolloutBatch, rows: list[int]) -> Window:
    resp_BT = batch.response_mask_BT[rows]
    stop = int(batch.attention_mask_BT[rows].sum(1).max())
    first = int(resp_BT.float().argmax(1).min())  # every row has at least one response token
    return Window(rows, max(1, first), stop)


def window_logits(model, batch: RolloutBatch, window: Window) -> Tensor:
    """Logits ``[len(rows), W, V]`` predicting the window's tokens (from the positions before)."""
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    ids = batch.input_ids_BT[window.rows, : window.stop].to(device)
    attn = batch.attention_mask_BT[window.rows, : window.stop].to(device)
    keep = window.stop - window.start + 1  # positions start-1 .. stop-1; the last predicts nothing
    return model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
