"""A teacher served by vLLM's OpenAI-compatible server (``vllm serve MODEL``).

vLLM's ``POST /v1/completions`` accepts a prompt as token ids and, as a vLLM extension,
``prompt_logprobs: k``: for every prompt position ``t >= 1`` a dict ``{token_id: {"logprob",
"rank", "decoded_token"}}`` holding the prompt's own token ``x_t`` and the ``k`` most likely
ones. Sending each whole sequence (prompt + response) as the prompt therefore gives
``log p_T(x_t | x_<t)`` at every response position, the same alignment as
:class:`kdrl.teacher.LocalTeacher`; one token is generated (greedily) and thrown away, since
vLLM refuses ``max_tokens: 0``.

What differs from ``kdrl serve-teacher`` (checked against vLLM 0.32's source and a running
server; ``docs/teacher-server.md`` has the table):

- Temperature 1 only. vLLM computes prompt log-probs as ``log_softmax`` of the raw logits in
  float32; neither the request's ``temperature`` nor ``--logprobs-mode processed_logprobs``
  reaches prompt positions, and a log-prob at another temperature cannot be recovered from
  log-probs at temperature 1 without every logit. A temperature other than 1 is refused.
- Normalised over all of the teacher's output rows (``config.vocab_size``), not over the
  student's ids: a teacher with padded embedding rows beyond the student's gives slightly
  different values than an in-process teacher that cuts them.
- Top-k up to the server's ``--max-logprobs`` (default 20); values are log-probs over the whole
  vocabulary like ``LocalTeacher``'s. No full distribution, no candidate ids.
- A ``-inf`` log-prob comes back as ``-9999.0`` (vLLM clamps it for JSON).
- No tokenizer check: the API does not expose the vocabulary, so make sure ``vllm serve``
  loads a model whose tokenizer is the student's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdrl.rollout import RolloutBatch
from kdrl.teacher import TeacherOutput
from kdrl.teacher_http import JSONClient, TeacherRequestError, TeacherResponseError
from kdrl.teacher_wire import response_positions


class OpenAITeacher:
    """:class:`kdrl.teacher.Teacher` over vLLM's ``/v1/completions`` with ``prompt_logprobs``."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        temperature: float = 1.0,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_sequences_per_request: int = 64,
    ) -> None:
        if temperature != 1.0:
            raise ValueError(
                f"teacher.temperature is {temperature}, but a vLLM (OpenAI-compatible) teacher "
                "scores at temperature 1 only: vLLM's prompt_logprobs are log_softmax of the raw "
                "logits. Use teacher.temperature: 1.0, or `kdrl serve-teacher --temperature "
                f"{temperature}` for this temperature"
            )
        if max_sequences_per_request < 1:
            raise ValueError(
                f"max_sequences_per_request must be >= 1, got {max_sequences_per_request}"
            )
        self.model, self.max_sequences = model, max_sequences_per_request
        self.http = JSONClient(
            url, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
            start_hint=(f"Start it with `vllm serve {model} --dtype float32 --port PORT` "
                        "(add --max-logprobs K for top-k above 20), or fix the teacher url."),
        )  # fmt: skip
        self.url = self.http.url

    def info(self) -> dict[str, Any]:
        """The server's ``/v1/models`` entry for ``model`` (``max_model_len``, ``root``, ...)."""
        body = self.http.get("/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise TeacherResponseError(f"teacher at {self.url}/v1/models: no 'data' list")
        names = [m.get("id") for m in data if isinstance(m, dict)]
        for entry in data:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                return entry
        raise TeacherResponseError(
            f"teacher at {self.url} serves {names}, not {self.model!r} (teacher model name; "
            "vllm serve --served-model-name sets it)"
        )

    def score(
        self, batch: RolloutBatch, *, top_k: int = 0, candidate_ids_BTC: Tensor | None = None
    ) -> TeacherOutput:
        if candidate_ids_BTC is not None:
            raise ValueError(
                "candidate_ids_BTC: a vLLM (OpenAI-compatible) teacher returns only top-k "
                "prompt log-probs; use `kdrl serve-teacher` (teacher.backend: http) for "
                "candidate ids"
            )
        if type(top_k) is not int or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        b, t = batch.input_ids_BT.shape
        logp_BT = torch.zeros(b, t, dtype=torch.float32)
        topk_lp_BTK = torch.zeros(b, t, top_k, dtype=torch.float32) if top_k else None
        topk_ids_BTK = torch.zeros(b, t, top_k, dtype=torch.long) if top_k else None
        for s in range(0, b, self.max_sequences):
            rows = list(range(s, min(b, s + self.max_sequences)))
            positions = response_positions(batch, rows)
            prompts = [
                batch.input_ids_BT[r, : int(batch.attention_mask_BT[r].sum())].tolist()
                for r in rows
            ]
            body = {
                "model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k, "n": 1,
            }  # fmt: skip
            try:
                reply = self.http.post("/v1/completions", body)
            except TeacherRequestError as err:
                if not top_k:
                    raise
                raise TeacherRequestError(
                    f"{err} (top_k={top_k}: vLLM returns at most its --max-logprobs, default "
                    "20, top log-probs per position; set teacher.top_k no larger)"
                ) from None
            choices = self._choices(reply, len(rows))
            for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
                where = f"choice {i} (batch row {row})"
                if len(choices[i]) != len(prompts[i]):
                    raise self._bad(
                        f"{where} has {len(choices[i])} prompt_logprobs for a "
                        f"{len(prompts[i])}-token prompt"
                    )
                for p in pos.tolist():
                    table = _logprob_table(choices[i][p], f"{where} position {p}")
                    token = prompts[i][p]
                    if token not in table:
                        raise self._bad(f"{where} position {p}: no log-prob for its token {token}")
                    logp_BT[row, p] = table[token]
                    if top_k:
                        if len(table) < top_k:
                            raise self._bad(f"{where} position {p}: {len(table)} log-probs for "
                                            f"top_k {top_k}")  # fmt: skip
                        # The prompt's token is listed first even when it is not in the top k;
                        # the k largest of all listed values are the top k.
                        best = sorted(table.items(), key=lambda kv: -kv[1])[:top_k]
                        topk_ids_BTK[row, p] = torch.tensor([k for k, _ in best])
                        topk_lp_BTK[row, p] = torch.tensor([v for _, v in best])
        return TeacherOutput(logp_BT, topk_lp_BTK, topk_ids_BTK)

    def _bad(self, message: str) -> TeacherResponseError:
        return TeacherResponseError(
            f"teacher at {self.url}/v1/completions sent an unexpected response: {message}"
        )

    def _choices(self, body: Any, n: int) -> list[list[Any]]:
        """``prompt_logprobs`` of each prompt, in prompt order (``index``)."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            raise self._bad("no 'choices' list")
        by_index: dict[int, list[Any]] = {}
        for c in choices:
            idx = c.get("index") if isinstance(c, dict) else None
            entries = c.get("prompt_logprobs") if isinstance(c, dict) else None
            if type(idx) is not int or not isinstance(entries, list):
                raise self._bad(
                    "a choice without an integer 'index' and a 'prompt_logprobs' list (is this "
                    "a vLLM server? prompt_logprobs is vLLM's extension of the OpenAI API)"
                )
            by_index[idx] = entries
        if sorted(by_index) != list(range(n)):
            raise self._bad(f"choices have indices {sorted(by_index)}, expected 0 .. {n - 1}")
        return [by_index[i] for i in range(n)]


def _logprob_table(entry: Any, where: str) -> dict[int, float]:
    """``{token_id: logprob}`` from one position of vLLM's ``prompt_logprobs``."""
    if not isinstance(entry, dict) or not entry:
        raise TeacherResponseError(
            f"{where}: expected a dict of token id -> log-prob, got {entry!r}"
        )
    out = {}
    for key, value in entry.items():
        lp = value.get("logprob") if isinstance(value, dict) else value
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise TeacherResponseError(f"{where}: token id {key!r} is not an integer") from None
        if isinstance(lp, bool) or not isinstance(lp, int | float) or math.isnan(lp):
            raise TeacherResponseError(f"{where}: token {key}: log-prob {lp!r} is not a number")
        out[token] = float(lp)
    return out
