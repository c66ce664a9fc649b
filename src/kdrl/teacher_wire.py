"""The JSON wire format between :class:`kdrl.teacher_http.HTTPTeacher` and ``kdrl
serve-teacher``: encoding both ways, and validation whose messages name the field and the row.

Shape legend: ``B`` sequences, ``T`` positions, ``K`` top-k, ``C`` candidate ids, ``R`` response
tokens of one row.

Only what is needed crosses the wire: each row's unpadded token ids and where its response is,
and back, one value per response token (not per position), in the row's order of response
positions. Log-probs are float32 on both ends; ``tolist()`` widens them to Python floats exactly,
``json`` writes the shortest text that reads back to the same double, and narrowing that double
to float32 gives the original bits, so remote scores equal local ones exactly. Non-finite values
are written as ``-Infinity`` / ``NaN`` (Python's ``json`` extension), never silently clipped.

This module needs neither the server's dependencies nor the network: the server and the client
both import it, and it is tested on its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdrl.rollout import RolloutBatch

API_VERSION = 1
"""Bumped when a field changes meaning; ``/health`` reports it and the client checks it."""


class WireError(ValueError):
    """A request or response that does not follow the schema; the message names field and row."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (every token string and its id, sorted).

    Two tokenizers with the same fingerprint map every id to the same token, which is what
    scoring the student's ids with the teacher needs. Normalisers and chat templates are not
    part of it: the teacher never tokenizes text.
    """
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_info(tokenizer) -> dict[str, Any]:
    return {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode("utf-8")


# ---- requests ------------------------------------------------------------------------------


@dataclass
class ScoreRequest:
    """A decoded ``POST /v1/score`` body, laid out as the teacher scores it."""

    batch: RolloutBatch
    top_k: int
    candidate_ids_BTC: Tensor | None


def _row_span(batch: RolloutBatch, b: int) -> tuple[int, Tensor]:
    """Unpadded length of row ``b`` and its response positions; rows must be right-padded."""
    attn = batch.attention_mask_BT[b].bool()
    n = int(attn.sum())
    if not attn[:n].all():
        raise ValueError(f"row {b}: attention mask is not right-padded ([tokens | padding])")
    pos = batch.response_mask_BT[b].nonzero().squeeze(1)
    if pos.numel() == 0 or int(pos[0]) < 1 or int(pos[-1]) >= n:
        raise ValueError(f"row {b}: needs response tokens at positions 1 .. {n - 1}")
    return n, pos


def response_positions(batch: RolloutBatch, rows: list[int]) -> list[Tensor]:
    """Each row's response positions, in the order the wire lists their values."""
    return [_row_span(batch, b)[1] for b in rows]


def encode_request(
    batch: RolloutBatch, rows: list[int], *, top_k: int, candidate_ids_BTC: Tensor | None
) -> dict[str, Any]:
    """The request body for some rows of a batch. Responses that run to their row's end (the
    rollout layout) are sent as ``response_start``; otherwise every row sends ``response_mask``."""
    lengths, positions = zip(*(_row_span(batch, b) for b in rows), strict=True)
    body: dict[str, Any] = {
        "input_ids": [
            batch.input_ids_BT[b, :n].tolist() for b, n in zip(rows, lengths, strict=True)
        ]
    }
    if all(p.numel() == n - int(p[0]) for n, p in zip(lengths, positions, strict=True)):
        body["response_start"] = [int(p[0]) for p in positions]  # each a suffix of its row
    else:
        body["response_mask"] = [
            batch.response_mask_BT[b, :n].int().tolist() for b, n in zip(rows, lengths, strict=True)
        ]
    if top_k:
        body["top_k"] = top_k
    if candidate_ids_BTC is not None:
        body["candidate_ids"] = [
            candidate_ids_BTC[b, p].tolist() for b, p in zip(rows, positions, strict=True)
        ]
    return body


def _int_tensor(value: Any, field: str, dims: int) -> Tensor:
    """``value`` (nested lists) as an int64 tensor of ``dims`` dimensions, or ``WireError``."""
    try:
        x = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise WireError(f"{field}: not a rectangular list of integers ({err})") from None
    if x.dtype != torch.int64 or x.dim() != dims:
        want = "a list of integers" if dims == 1 else f"{dims} levels of lists of integers"
        raise WireError(f"{field}: expected {want}, got {x.dim()} level(s) of {x.dtype} values")
    return x


def _list(value: Any, field: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise WireError(f"{field}: expected a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise WireError(f"{field}: expected {length} entries, got {len(value)}")
    return value


def _check_ids(x: Tensor, field: str, vocab: int) -> None:
    bad = (x < 0) | (x >= vocab)
    if bad.any():
        first = int(x[bad][0])
        raise WireError(f"{field}: token id {first} is out of the vocabulary [0, {vocab})")


def decode_request(body: Any, *, vocab: int, max_positions: int | None = None) -> ScoreRequest:
    """Validate a ``POST /v1/score`` body and lay it out as a right-padded batch."""
    if not isinstance(body, dict):
        raise WireError(f"body: expected a JSON object, got {type(body).__name__}")
    unknown = set(body) - {"input_ids", "response_start", "response_mask", "top_k",
                           "candidate_ids"}  # fmt: skip
    if unknown:
        raise WireError(f"unknown field(s) {sorted(unknown)}")
    rows = _list(body.get("input_ids"), "input_ids")
    if not rows:
        raise WireError("input_ids: expected at least one sequence")
    if ("response_start" in body) == ("response_mask" in body):
        raise WireError("give exactly one of response_start (per row) or response_mask")
    top_k = body.get("top_k", 0)
    if type(top_k) is not int or top_k < 0:
        raise WireError(f"top_k: expected an integer >= 0, got {top_k!r}")

    ids = []
    for b, row in enumerate(rows):
        x = _int_tensor(_list(row, f"input_ids row {b}"), f"input_ids row {b}", 1)
        if x.numel() < 2:
            raise WireError(f"input_ids row {b}: needs at least 2 tokens, got {x.numel()}")
        if max_positions is not None and x.numel() > max_positions:
            raise WireError(f"input_ids row {b}: {x.numel()} tokens exceed the teacher's "
                            f"{max_positions} positions")  # fmt: skip
        _check_ids(x, f"input_ids row {b}", vocab)
        ids.append(x)
    resp = _response_masks(body, ids)

    n, width = len(ids), max(x.numel() for x in ids)
    ids_BT = torch.zeros(n, width, dtype=torch.long)
    attn_BT = torch.zeros(n, width, dtype=torch.long)
    resp_BT = torch.zeros(n, width, dtype=torch.bool)
    for b, (x, r) in enumerate(zip(ids, resp, strict=True)):
        ids_BT[b, : x.numel()], attn_BT[b, : x.numel()], resp_BT[b, : x.numel()] = x, 1, r
    batch = RolloutBatch(
        input_ids_BT=ids_BT, attention_mask_BT=attn_BT, response_mask_BT=resp_BT,
        behav_logprobs_BT=torch.zeros(n, width), prompt_index_B=list(range(n)),
        truncated_B=torch.zeros(n, dtype=torch.bool),
    )  # fmt: skip
    cands = None
    if body.get("candidate_ids") is not None:
        cands = _candidates(body["candidate_ids"], resp_BT, vocab)
    return ScoreRequest(batch, top_k, cands)


def _response_masks(body: dict, ids: list[Tensor]) -> list[Tensor]:
    out = []
    if "response_start" in body:
        starts = _list(body["response_start"], "response_start", len(ids))
        for b, (s, x) in enumerate(zip(starts, ids, strict=True)):
            if type(s) is not int or not 1 <= s < x.numel():
                raise WireError(f"response_start row {b}: expected an integer in "
                                f"[1, {x.numel() - 1}], got {s!r}")  # fmt: skip
            r = torch.zeros(x.numel(), dtype=torch.bool)
            r[s:] = True
            out.append(r)
        return out
    masks = _list(body["response_mask"], "response_mask", len(ids))
    for b, (m, x) in enumerate(zip(masks, ids, strict=True)):
        field = f"response_mask row {b}"
        r = _int_tensor(_list(m, field, x.numel()), field, 1)
        if ((r != 0) & (r != 1)).any():
            raise WireError(f"{field}: expected 0/1 values")
        if r[0] or not r.any():
            raise WireError(f"{field}: needs a response token and none at position 0 (a first "
                            "token has nothing to predict it)")  # fmt: skip
        out.append(r.bool())
    return out


def _candidates(value: Any, resp_BT: Tensor, vocab: int) -> Tensor:
    rows = _list(value, "candidate_ids", resp_BT.shape[0])
    width = None
    per_row = []
    for b, row in enumerate(rows):
        field = f"candidate_ids row {b}"
        n_resp = int(resp_BT[b].sum())
        x = _int_tensor(_list(row, field, n_resp), field, 2)
        if width is None:
            width = x.shape[1]
        if x.shape[1] != width or width < 1:
            raise WireError(
                f"{field}: every response position needs the same number (>= 1) of candidate "
                f"ids; got {x.shape[1]}, the first row had {width}"
            )
        _check_ids(x, field, vocab)
        per_row.append(x)
    out_BTC = torch.zeros(*resp_BT.shape, width, dtype=torch.long)
    for b, x in enumerate(per_row):
        out_BTC[b, resp_BT[b]] = x
    return out_BTC


# ---- responses -----------------------------------------------------------------------------


def encode_response(out, batch: RolloutBatch) -> dict[str, Any]:
    """Per row, the values at its response positions. ``out`` is a ``TeacherOutput``."""
    pos = [batch.response_mask_BT[b].nonzero().squeeze(1) for b in range(batch.num_sequences)]
    body: dict[str, Any] = {"logprobs": [out.logprobs_BT[b, p].tolist() for b, p in enumerate(pos)]}
    if out.topk_logprobs_BTK is not None:
        body["topk_logprobs"] = [out.topk_logprobs_BTK[b, p].tolist() for b, p in enumerate(pos)]
        body["topk_ids"] = [out.topk_ids_BTK[b, p].tolist() for b, p in enumerate(pos)]
    if out.candidate_logprobs_BTC is not None:
        body["candidate_logprobs"] = [
            out.candidate_logprobs_BTC[b, p].tolist() for b, p in enumerate(pos)
        ]
    return body


@dataclass
class ScoredRows:
    """A decoded response: per requested row, ``[R]`` / ``[R, K]`` / ``[R, C]`` tensors."""

    logprobs: list[Tensor]
    topk_logprobs: list[Tensor] | None
    topk_ids: list[Tensor] | None
    candidate_logprobs: list[Tensor] | None


def _float_rows(body: dict, field: str, counts: list[int], width: int | None) -> list[Tensor]:
    rows = _list(body.get(field), field, len(counts))
    out = []
    for b, (row, n) in enumerate(zip(rows, counts, strict=True)):
        name = f"{field} row {b}"
        try:
            x = torch.tensor(_list(row, name, n), dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise WireError(f"{name}: not a rectangular list of numbers ({err})") from None
        shape = (n,) if width is None else (n, width)
        if tuple(x.shape) != shape:
            raise WireError(f"{name}: expected shape {list(shape)}, got {list(x.shape)}")
        out.append(x)
    return out


def decode_response(
    body: Any, counts: list[int], *, top_k: int, n_candidates: int | None
) -> ScoredRows:
    """Validate a ``/v1/score`` response for rows with ``counts`` (>= 1) response tokens each."""
    if not isinstance(body, dict):
        raise WireError(f"body: expected a JSON object, got {type(body).__name__}")
    logprobs = _float_rows(body, "logprobs", counts, None)
    topk_lp = topk_ids = cand = None
    if top_k:
        first = _list(body.get("topk_logprobs"), "topk_logprobs", len(counts))[0]
        k = len(first[0]) if isinstance(first, list) and first and isinstance(first[0], list) else 0
        if not 1 <= k <= top_k:
            raise WireError(f"topk_logprobs: expected 1 .. {top_k} values per position, got {k}")
        topk_lp = _float_rows(body, "topk_logprobs", counts, k)
        ids = _list(body.get("topk_ids"), "topk_ids", len(counts))
        topk_ids = []
        for b, (row, n) in enumerate(zip(ids, counts, strict=True)):
            name = f"topk_ids row {b}"
            x = _int_tensor(_list(row, name, n), name, 2)
            if tuple(x.shape) != (n, k):
                raise WireError(f"{name}: expected shape [{n}, {k}], got {list(x.shape)}")
            topk_ids.append(x)
    if n_candidates is not None:
        cand = _float_rows(body, "candidate_logprobs", counts, n_candidates)
    return ScoredRows(logprobs, topk_lp, topk_ids, cand)
