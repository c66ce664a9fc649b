"""A tiny autoregressive "language model" whose every sequence can be enumerated.

Vocabulary ``V = 4``: tokens 0-2 are ordinary, token 3 is EOS. Sequences stop at EOS or after
``L = 3`` tokens. The policy is a table of logits, one row per prefix of ordinary tokens
(``1 + 3 + 9 = 13`` prefixes), so exact expectations are finite sums over 40 sequences.

Shape legend: ``S`` prefixes (states), ``V`` vocab, ``B`` sequences, ``T = L`` positions,
``X`` enumerated sequences.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

V, EOS, L = 4, 3, 3
N_ORD = V - 1
OFFSETS = [0, 1, 1 + N_ORD, 1 + N_ORD + N_ORD**2]
N_STATES = OFFSETS[L]


def next_state(state: Tensor, depth: int, token: Tensor) -> Tensor:
    """Index of prefix + token (only meaningful for ordinary tokens)."""
    local = state - OFFSETS[depth]
    return OFFSETS[depth + 1] + local * N_ORD + token.clamp(max=N_ORD - 1)


@dataclass
class Batch:
    """Sequences as padded ``[B, T]`` tensors; positions after EOS are masked and hold EOS."""

    tokens_BT: Tensor
    states_BT: Tensor
    mask_BT: Tensor


def sample(theta_SV: Tensor, n: int, generator: torch.Generator) -> Batch:
    """``n`` sequences from ``softmax(theta)`` (no gradient), vectorised."""
    probs_SV = torch.softmax(theta_SV.detach(), dim=-1)
    state_B = torch.zeros(n, dtype=torch.long)
    alive_B = torch.ones(n, dtype=torch.bool)
    tokens, states, masks = [], [], []
    for t in range(L):
        tok_B = torch.multinomial(probs_SV[state_B], 1, generator=generator).squeeze(1)
        tok_B = torch.where(alive_B, tok_B, EOS)
        tokens.append(tok_B)
        states.append(state_B)
        masks.append(alive_B)
        alive_B = alive_B & (tok_B != EOS)
        if t + 1 < L:
            state_B = torch.where(alive_B, next_state(state_B, t, tok_B), OFFSETS[t + 1])
    return Batch(torch.stack(tokens, 1), torch.stack(states, 1), torch.stack(masks, 1))


def enumerate_all() -> Batch:
    """All 40 sequences, in the same padded layout as :func:`sample`."""
    seqs: list[tuple[int, ...]] = []
    for length in range(1, L + 1):
        for prefix in itertools.product(range(N_ORD), repeat=length - 1):
            seqs.append((*prefix, EOS))
    seqs.extend(itertools.product(range(N_ORD), repeat=L))
    tokens_BT = torch.full((len(seqs), L), EOS, dtype=torch.long)
    states_BT = torch.zeros((len(seqs), L), dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), L), dtype=torch.bool)
    for b, seq in enumerate(seqs):
        state = torch.tensor(0)
        for t, tok in enumerate(seq):
            tokens_BT[b, t], states_BT[b, t], mask_BT[b, t] = tok, state, True
            if t + 1 < L:
                state = next_state(state, t, torch.tensor(tok))
    return Batch(tokens_BT, states_BT, mask_BT)


def token_logprobs(theta_SV: Tensor, batch: Batch) -> Tensor:
    """``log softmax(theta)[state, token]`` per position, differentiable in ``theta``."""
    logp_SV = torch.log_softmax(theta_SV, dim=-1)
    return logp_SV[batch.states_BT, batch.tokens_BT]


def state_probs(theta_SV: Tensor) -> Tensor:
    """Probability of reaching each prefix state under ``softmax(theta)``, ``[S]``."""
    p_SV = torch.softmax(theta_SV, dim=-1)
    reach = [torch.ones((), dtype=theta_SV.dtype)]
    for depth in range(L - 1):
        for local in range(N_ORD**depth):
            s = OFFSETS[depth] + local
            for tok in range(N_ORD):
                reach.append(reach[s] * p_SV[s, tok])
    return torch.stack(reach)


def exact_token_rkl(theta_SV: Tensor, teacher_SV: Tensor) -> Tensor:
    """``sum_h sg(q(h)) KL(q(.|h) || p(.|h))``: its gradient is the per-token reverse KL one."""
    lq_SV, lp_SV = torch.log_softmax(theta_SV, -1), torch.log_softmax(teacher_SV, -1)
    kl_S = (lq_SV.exp() * (lq_SV - lp_SV)).sum(-1)
    return (state_probs(theta_SV).detach() * kl_S).sum()


def exact_sequence_rkl(theta_SV: Tensor, teacher_SV: Tensor) -> Tensor:
    """``KL(q || p)`` over whole sequences."""
    batch = enumerate_all()
    lq_X = (token_logprobs(theta_SV, batch) * batch.mask_BT).sum(1)
    lp_X = (token_logprobs(teacher_SV, batch) * batch.mask_BT).sum(1)
    return (lq_X.exp() * (lq_X - lp_X)).sum()


def exact_mean_length(theta_SV: Tensor) -> float:
    batch = enumerate_all()
    lq_X = (token_logprobs(theta_SV, batch) * batch.mask_BT).sum(1)
    return float((lq_X.exp() * batch.mask_BT.sum(1)).sum())
