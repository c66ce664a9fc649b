"""Masked reductions shared by every loss.

Shape legend: ``B`` sequences, ``T`` token positions. ``mask_BT`` is true on the response tokens
that enter the loss; prompt, padding and post-EOS positions are false.

Losses are *sums over valid tokens divided by an explicit* ``num_tokens``: the number of valid
tokens in the whole global batch (all micro-batches, all ranks). Summing the micro-batch losses
then gives exactly the loss of the full batch, whatever the split.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Sum of ``x`` over valid positions. Invalid positions may hold ``inf``/``nan``: they are
    replaced by zero *before* summing, so they reach neither the value nor the gradient."""
    return torch.where(mask_BT, x_BT, x_BT.new_zeros(())).sum()


def where_valid(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``x`` at valid positions, 0 elsewhere; use on inputs before arithmetic that could turn a
    masked ``-inf`` into a ``nan`` gradient (``0 * inf``)."""
    return torch.where(mask_BT, x_BT, x_BT.new_zeros(()))


def check_num_tokens(num_tokens: float) -> None:
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0 (global count of valid tokens), got {num_tokens}")
