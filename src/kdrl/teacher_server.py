"""``kdrl serve-teacher``: the frozen teacher behind HTTP, so it can live on another machine.

Endpoints (the schema is in ``docs/teacher-server.md`` and :mod:`kdrl.teacher_wire`):

- ``GET /health``: the model, the vocabulary it normalises over, its temperature and the
  tokenizer's size and fingerprint, so a client can refuse a teacher whose ids mean other tokens.
- ``POST /v1/score``: token ids and where each response starts -> per response token the
  teacher's log-prob, optionally its top-k and the log-probs of given candidate ids.

Scores are computed by :class:`kdrl.teacher.LocalTeacher`, the in-process teacher, so a remote
score equals a local one. One model serves one request at a time (a lock): inference is bound
by the CPU or GPU, and two forward passes at once would only share it. Each request is batched
as the client sent it and split into micro-batches by the token budget as in-process; the client
splits a large batch along the same micro-batches, so the split cannot change a single bit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kdrl.teacher import LocalTeacher, TeacherOutput
from kdrl.teacher_wire import (
    API_VERSION,
    ScoreRequest,
    WireError,
    decode_request,
    dumps,
    encode_response,
    tokenizer_info,
)

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200) -> Response:
    # Starlette's JSONResponse refuses -inf; a log-prob may be -inf, and Python reads it back.
    return Response(dumps(body), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def build_app(
    teacher: LocalTeacher, tokenizer, *, model_name: str, max_positions: int | None = None
) -> Starlette:
    """The ASGI app around an already loaded teacher (tests use it with their own model)."""
    lock = threading.Lock()
    health = {
        "status": "ok",
        "api_version": API_VERSION,
        "model": model_name,
        "vocab_size": teacher.vocab,
        "temperature": teacher.temperature,
        "max_tokens_per_mb": teacher.max_tokens,
        "max_positions": max_positions,
        "tokenizer": tokenizer_info(tokenizer),
    }

    def run(req: ScoreRequest) -> bytes:
        with lock:
            t0 = time.perf_counter()
            out: TeacherOutput = teacher.score(
                req.batch, top_k=req.top_k, candidate_ids_BTC=req.candidate_ids_BTC
            )
            t1 = time.perf_counter()
        body = dumps(encode_response(out, req.batch))
        log.debug(
            "scored %d sequences, %d tokens (%d response), top_k=%d, candidates=%s: "
            "%.3f s model, %.3f s encode, %d bytes",
            req.batch.num_sequences, int(req.batch.attention_mask_BT.sum()),
            int(req.batch.response_mask_BT.sum()), req.top_k,
            None if req.candidate_ids_BTC is None else req.candidate_ids_BTC.shape[-1],
            t1 - t0, time.perf_counter() - t1, len(body),
        )  # fmt: skip
        return body

    async def get_health(request: Request) -> Response:
        return _json(health)

    async def post_score(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"body: not valid JSON ({err})")
        try:
            req = decode_request(body, vocab=teacher.vocab, max_positions=max_positions)
        except WireError as err:
            log.debug("rejected a request: %s", err)
            return _error(400, str(err))
        try:
            payload = await run_in_threadpool(run, req)
        except Exception as err:  # the model failed (out of memory, ...): the client may retry
            log.exception("scoring failed")
            return _error(500, f"teacher failed: {type(err).__name__}: {err}")
        return Response(payload, media_type="application/json")

    return Starlette(
        routes=[
            Route("/health", get_health, methods=["GET"]),
            Route("/v1/score", post_score, methods=["POST"]),
        ]
    )


def load_app(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    temperature: float = 1.0,
    max_tokens_per_mb: int = 16384,
    vocab: int | None = None,
) -> Starlette:
    """Load the teacher (a Hugging Face folder or name) and its tokenizer, and build the app.

    ``vocab`` is the number of ids the distribution is normalised over, as the in-process trainer
    does with the student's output rows; by default the teacher's own output rows (no cut).
    """
    from kdrl.models import load_teacher, load_tokenizer

    tokenizer = load_tokenizer(model, key="--model")
    net = load_teacher(model, dtype=dtype, device=device)
    rows = net.get_output_embeddings().weight.shape[0]
    if vocab is not None and not 1 <= vocab <= rows:
        raise ValueError(
            f"--vocab must lie in [1, {rows}] (the teacher's output rows), got {vocab}"
        )
    teacher = LocalTeacher(
        net, temperature=temperature, max_tokens_per_mb=max_tokens_per_mb, vocab=vocab or rows
    )
    max_positions = getattr(net.config, "max_position_embeddings", None)
    name = Path(model).name if Path(model).exists() else model
    return build_app(teacher, tokenizer, model_name=name, max_positions=max_positions)


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **load_kwargs: Any,
) -> None:
    """Load the teacher and serve it until interrupted (one worker: one model in memory)."""
    import uvicorn  # only the server needs it: pip install 'kdrl[serve]'

    app = load_app(model, **load_kwargs)
    logging.getLogger("kdrl").setLevel(log_level.upper())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1)
    server = uvicorn.Server(config)
    log.info("teacher %s on http://%s:%d (POST /v1/score, GET /health)", model, host, port)
    server.run()
