"""A teacher in another process or machine: the client of ``kdrl serve-teacher``.

:class:`HTTPTeacher` implements :class:`kdrl.teacher.Teacher` over HTTP with the standard
library only, so a trainer needs no extra package to use a remote teacher. It retries what may
pass (connection refused or reset, timeouts, HTTP 5xx) with exponential backoff, and never
retries what cannot (HTTP 4xx: the request itself is wrong, and the server's message says which
field and row).

A large batch is split into requests of at most ``max_sequences_per_request`` rows along the
server's own token-budget micro-batches (its ``/health`` gives the budget). A forward pass's
float rounding depends on which rows share it, so splitting anywhere else would change the
last bits; split this way, remote scores equal in-process ``LocalTeacher`` scores bit for bit.

:class:`JSONClient` is the retrying transport, shared with :mod:`kdrl.teacher_openai`.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from kdrl.microbatch import token_budget_microbatches
from kdrl.rollout import RolloutBatch
from kdrl.teacher import TeacherOutput, check_candidate_ids
from kdrl.teacher_wire import (
    API_VERSION,
    WireError,
    decode_response,
    dumps,
    encode_request,
    response_positions,
    tokenizer_info,
)

log = logging.getLogger(__name__)


class TeacherUnavailable(RuntimeError):
    """The teacher server could not be reached (or kept failing) after every retry."""


class TeacherRequestError(ValueError):
    """The server rejected a request (HTTP 4xx); retrying the same request cannot help."""


class TeacherResponseError(RuntimeError):
    """The server answered with something that does not follow the schema."""


class TeacherMismatch(ValueError):
    """The server's teacher does not fit the student (tokenizer, vocabulary, temperature)."""


def _server_message(err: urllib.error.HTTPError) -> str:
    """The reason a server gave: kdrl's ``{"error": msg}``, OpenAI's ``{"error": {"message"}}``,
    or the raw text."""
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:2000] or str(err.reason)
    msg = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(msg, dict):
        msg = msg.get("message", msg)
    return str(msg)[:2000]


class JSONClient:
    """JSON over HTTP to one server, with retries and a message that says what to do."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float = 30.0,
        start_hint: str,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"teacher url must look like http://HOST:PORT, got {url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                "teacher client: timeout_s must be > 0, max_retries >= 0 and backoff_s >= 0, got "
                f"{timeout_s}, {max_retries}, {backoff_s}"
            )
        self.url = url.rstrip("/")
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.start_hint = start_hint

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, dumps(body))

    def _call(self, method: str, path: str, data: bytes | None) -> Any:
        url, t0, last = self.url + path, time.monotonic(), ""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as err:  # before URLError: it is one
                msg = _server_message(err)
                if 400 <= err.code < 500:
                    raise TeacherRequestError(
                        f"teacher at {url} rejected the request (HTTP {err.code}): {msg}"
                    ) from None
                last = f"HTTP {err.code}: {msg}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                # refused, reset, DNS, timeout (TimeoutError is an OSError), truncated reply
                reason = getattr(err, "reason", None) or err
                last = f"{type(reason).__name__}: {reason}"
            else:
                try:
                    return json.loads(raw)
                except ValueError as err:
                    raise TeacherResponseError(
                        f"teacher at {url} answered with invalid JSON ({err}): {raw[:200]!r}"
                    ) from None
            log.warning("teacher %s %s: attempt %d/%d failed: %s", method, url, attempt + 1,
                        self.max_retries + 1, last)  # fmt: skip
        raise TeacherUnavailable(
            f"teacher server at {self.url} is unavailable: {self.max_retries + 1} attempts of "
            f"{method} {path} over {time.monotonic() - t0:.1f} s failed; last error: {last}. "
            f"Is it running? {self.start_hint}"
        )


def _field(body: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TeacherResponseError(f"{where}: field {name!r} is missing or not {kinds}: {value!r}")
    return value


class HTTPTeacher:
    """The teacher served by ``kdrl serve-teacher --model PATH`` at ``url``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_sequences_per_request: int = 64,
    ) -> None:
        if max_sequences_per_request < 1:
            raise ValueError(
                f"max_sequences_per_request must be >= 1, got {max_sequences_per_request}"
            )
        parts = urlsplit(url)
        host, port = parts.hostname or "HOST", parts.port or 8000
        self.http = JSONClient(
            url, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
            start_hint=(f"Start it with `kdrl serve-teacher --model TEACHER_PATH --host {host} "
                        f"--port {port}` (pip install 'kdrl[serve]'), or fix the teacher url."),
        )  # fmt: skip
        self.url = self.http.url
        self.max_sequences = max_sequences_per_request
        self._budget: int | None = None  # the server's max_tokens_per_mb, read once

    def requests(self, batch: RolloutBatch) -> list[list[int]]:
        """Rows of each request: whole server micro-batches, at most ``max_sequences_per_request``
        rows unless one micro-batch alone is larger (it is never split)."""
        if self._budget is None:
            self._budget = self.info()["max_tokens_per_mb"]
        lengths = batch.attention_mask_BT.sum(1).tolist()
        out: list[list[int]] = []
        current: list[int] = []
        for group in token_budget_microbatches(lengths, self._budget):
            if current and len(current) + len(group) > self.max_sequences:
                out.append(sorted(current))
                current = []
            current += group
        return [*out, sorted(current)] if current else out

    def info(self) -> dict[str, Any]:
        """``GET /health``: model, vocab_size, temperature, tokenizer {vocab_size, fingerprint}."""
        body = self.http.get("/health")
        where = f"teacher at {self.url}/health"
        if _field(body, "status", str, where) != "ok":
            raise TeacherResponseError(f"{where}: status is {body['status']!r}, not 'ok'")
        if _field(body, "api_version", int, where) != API_VERSION:
            raise TeacherResponseError(
                f"{where}: speaks API version {body['api_version']}, this kdrl speaks "
                f"{API_VERSION}; run the same kdrl version on both ends"
            )
        _field(body, "vocab_size", int, where)
        _field(body, "temperature", (int, float), where)
        if _field(body, "max_tokens_per_mb", int, where) < 1:
            raise TeacherResponseError(f"{where}: max_tokens_per_mb must be >= 1")
        tok = _field(body, "tokenizer", dict, where)
        _field(tok, "vocab_size", int, f"{where} tokenizer")
        _field(tok, "fingerprint", str, f"{where} tokenizer")
        return body

    def check(
        self, vocab_size: int, tokenizer=None, *, temperature: float | None = None
    ) -> dict[str, Any]:
        """Refuse a teacher that would score other tokens or another distribution than the
        in-process teacher would: a different tokenizer (size or fingerprint), a different number
        of ids normalised over (``vocab_size``: the student's output rows, as the trainer passes
        to ``LocalTeacher``), or a different temperature. Returns the ``/health`` data."""
        info = self.info()
        problems = []
        if info["vocab_size"] != vocab_size:
            problems.append(
                f"it normalises over {info['vocab_size']} token ids, the student has "
                f"{vocab_size} (restart it with --vocab {vocab_size})"
            )
        if tokenizer is not None:
            mine, theirs = tokenizer_info(tokenizer), info["tokenizer"]
            if mine != theirs:
                problems.append(
                    f"its tokenizer differs ({theirs['vocab_size']} tokens, fingerprint "
                    f"{theirs['fingerprint']}; the student's: {mine['vocab_size']} tokens, "
                    f"fingerprint {mine['fingerprint']}): the teacher scores the student's token "
                    "ids, so both must share one tokenizer"
                )
        if temperature is not None and info["temperature"] != temperature:
            problems.append(
                f"it scores at temperature {info['temperature']}, teacher.temperature is "
                f"{temperature} (restart it with --temperature {temperature})"
            )
        if problems:
            raise TeacherMismatch(
                f"teacher at {self.url} ({info.get('model')}) does not fit this student: "
                + "; ".join(problems)
            )
        return info

    def score(
        self, batch: RolloutBatch, *, top_k: int = 0, candidate_ids_BTC: Tensor | None = None
    ) -> TeacherOutput:
        if type(top_k) is not int or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        b, t = batch.input_ids_BT.shape
        n_cand = None
        if candidate_ids_BTC is not None:
            check_candidate_ids(batch, candidate_ids_BTC, 1 << 62)  # the server checks the range
            n_cand = candidate_ids_BTC.shape[-1]
        logp_BT = torch.zeros(b, t, dtype=torch.float32)
        cand_BTC = torch.zeros(b, t, n_cand, dtype=torch.float32) if n_cand else None
        topk_lp_BTK = topk_ids_BTK = None
        for rows in self.requests(batch) if b else []:
            positions = response_positions(batch, rows)
            body = encode_request(batch, rows, top_k=top_k, candidate_ids_BTC=candidate_ids_BTC)
            try:
                reply = self.http.post("/v1/score", body)
            except TeacherRequestError as err:
                raise TeacherRequestError(
                    f"{err} (request row i is batch row rows[i] of rows={rows})"
                ) from None
            try:
                got = decode_response(
                    reply, [p.numel() for p in positions], top_k=top_k, n_candidates=n_cand
                )
            except WireError as err:
                raise TeacherResponseError(
                    f"teacher at {self.url}/v1/score sent a malformed response: {err}"
                ) from None
            if got.topk_logprobs is not None:
                k = got.topk_logprobs[0].shape[-1]
                if topk_lp_BTK is None:
                    topk_lp_BTK = torch.zeros(b, t, k, dtype=torch.float32)
                    topk_ids_BTK = torch.zeros(b, t, k, dtype=torch.long)
                elif topk_lp_BTK.shape[-1] != k:
                    raise TeacherResponseError(
                        f"teacher at {self.url} returned top-{k} for batch rows {rows}, top-"
                        f"{topk_lp_BTK.shape[-1]} before"
                    )
            for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
                logp_BT[row, pos] = got.logprobs[i]
                if topk_lp_BTK is not None:
                    topk_lp_BTK[row, pos] = got.topk_logprobs[i]
                    topk_ids_BTK[row, pos] = got.topk_ids[i]
                if cand_BTC is not None:
                    cand_BTC[row, pos] = got.candidate_logprobs[i]
        return TeacherOutput(logp_BT, topk_lp_BTK, topk_ids_BTK, cand_BTC)
