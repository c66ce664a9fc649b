"""The teacher as a service: ``kdrl serve-teacher`` and :class:`HTTPTeacher`, over real HTTP on
the loopback interface, against the in-process :class:`LocalTeacher` on the same tiny model.

Also the new ``candidate_ids_BTC`` of ``LocalTeacher`` itself, and the JSON float round trip
that makes remote scores exact.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.cli import main
from kdrl.teacher import LocalTeacher
from kdrl.teacher_http import (
    HTTPTeacher,
    JSONClient,
    TeacherMismatch,
    TeacherRequestError,
    TeacherResponseError,
    TeacherUnavailable,
)
from kdrl.teacher_server import build_app
from kdrl.teacher_wire import dumps, tokenizer_fingerprint
from kdrl.tiny import DEFAULT_CHARS, char_tokenizer
from loopback import batch_of, free_port, random_batch, serving

TEMPERATURE, BUDGET, PAD = 0.7, 60, 7

# One torch thread: these tests start servers beside the model; two processes spinning on
# both cores of this machine would slow each other down.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    """The tiny teacher (5 padded embedding rows) cut to the student's vocabulary, at a
    temperature other than 1, with a token budget that makes several micro-batches."""
    path = tiny_pair[1]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return LocalTeacher(
        model, temperature=TEMPERATURE, max_tokens_per_mb=BUDGET, vocab=len(tok)
    ), tok


@pytest.fixture(scope="module")
def server(teacher):
    local, tok = teacher
    with serving(build_app(local, tok, model_name="tiny-teacher", max_positions=512)) as s:
        yield s


def candidates(batch, vocab: int, c: int = 4, seed: int = 1):
    """Random candidate ids; the first is the sampled token; -1 off response positions."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.randint(0, vocab, (*batch.input_ids_BT.shape, c), generator=g)
    cand[..., 0] = batch.input_ids_BT
    return torch.where(batch.response_mask_BT[..., None], cand, -1)


def assert_same(got, want, batch):
    """Bit-identical scores. LocalTeacher leaves top-k values at off-response positions of a
    micro-batch's window (they are masked everywhere); the wire carries response positions."""
    assert torch.equal(got.logprobs_BT, want.logprobs_BT)
    r = batch.response_mask_BT
    for name in ("topk_logprobs_BTK", "topk_ids_BTK"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.shape == w.shape and torch.equal(g[r], w[r]), name
            assert (g[~r] == 0).all()
    g, w = got.candidate_logprobs_BTC, want.candidate_logprobs_BTC
    assert (g is None) == (w is None)
    if g is not None:
        assert torch.equal(g, w)


# ---- LocalTeacher candidate ids ------------------------------------------------------------


def test_local_candidate_logprobs_are_the_full_distribution_at_those_ids(teacher):
    local, tok = teacher
    batch = random_batch(6, len(tok), pad=PAD, seed=3)
    cand = candidates(batch, len(tok))
    out = local.score(batch, top_k=len(tok), candidate_ids_BTC=cand)
    r = batch.response_mask_BT
    # The first candidate is the sampled token: the same arithmetic, the same bits.
    assert torch.equal(out.candidate_logprobs_BTC[..., 0], out.logprobs_BT)
    full = out.topk_logprobs_BTK  # top_k = V: the whole distribution, ids in order
    want = full.gather(-1, cand.clamp(min=0))
    torch.testing.assert_close(out.candidate_logprobs_BTC[r], want[r], atol=2e-6, rtol=0)
    assert (out.candidate_logprobs_BTC[~r] == 0).all()
    assert local.score(batch).candidate_logprobs_BTC is None


def test_local_candidate_ids_are_validated(teacher):
    local, tok = teacher
    batch = random_batch(3, len(tok), pad=PAD, seed=4)
    cand = candidates(batch, len(tok))
    row, pos = 2, int(batch.response_mask_BT[2].nonzero()[0])
    bad = cand.clone()
    bad[row, pos, 1] = len(tok)
    with pytest.raises(ValueError, match=rf"candidate_ids_BTC row {row} position {pos}"):
        local.score(batch, candidate_ids_BTC=bad)
    with pytest.raises(ValueError, match=r"must be \[B, T, C\]"):
        local.score(batch, candidate_ids_BTC=cand[:, :-1])
    with pytest.raises(ValueError, match="integer ids"):
        local.score(batch, candidate_ids_BTC=cand.float())


# ---- the wire ------------------------------------------------------------------------------


def test_float32_survives_json_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=g) * 30,
        -torch.rand(20000, generator=g).log() * 1e-3,
        torch.tensor([-float("inf"), 0.0, -0.0, 1e-45, -1e-45, 1.17e-38, -3.4e38, 3.4e38]),
    ]).float()  # fmt: skip
    back = torch.tensor(json.loads(dumps(x.tolist())), dtype=torch.float32)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # every bit, sign of 0 too


# ---- scores over HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize("per_request", [64, 3, 1])
def test_remote_scores_equal_local_bit_for_bit(teacher, server, per_request):
    local, tok = teacher
    batch = random_batch(13, len(tok), pad=PAD, seed=per_request)
    remote = HTTPTeacher(server.url, max_sequences_per_request=per_request)
    if per_request < 13:  # the batch really is split, along the server's micro-batches
        assert len(remote.requests(batch)) > 1
    assert_same(remote.score(batch), local.score(batch), batch)
    cand = candidates(batch, len(tok))
    assert_same(
        remote.score(batch, top_k=5, candidate_ids_BTC=cand),
        local.score(batch, top_k=5, candidate_ids_BTC=cand),
        batch,
    )


def test_full_distribution_and_gappy_response_masks(teacher, server):
    local, tok = teacher
    batch = random_batch(5, len(tok), pad=PAD, seed=11)
    # A response with a hole (e.g. a tool's output inside it) goes over the wire as a mask.
    row = 1
    pos = batch.response_mask_BT[row].nonzero().squeeze(1)
    batch.response_mask_BT[row, pos[0] + 1] = False
    assert len(pos) > 2
    got = HTTPTeacher(server.url).score(batch, top_k=10**9)
    assert got.topk_logprobs_BTK.shape[-1] == len(tok)
    assert_same(got, local.score(batch, top_k=10**9), batch)


def test_requests_never_split_a_server_micro_batch(teacher, server):
    _, tok = teacher
    batch = random_batch(20, len(tok), pad=PAD, seed=5, max_prompt=2, max_response=2)
    requests = HTTPTeacher(server.url, max_sequences_per_request=4).requests(batch)
    assert sorted(r for rows in requests for r in rows) == list(range(20))
    # Rows of at most 4 tokens with a budget of 60: micro-batches of 15 and more rows, each
    # sent whole although it exceeds max_sequences_per_request.
    assert all(len(rows) >= 15 or rows is requests[-1] for rows in requests)


# ---- errors --------------------------------------------------------------------------------


def _post(url: str, body) -> str:
    client = JSONClient(url, timeout_s=10, max_retries=3, backoff_s=5.0, start_hint="")
    t0 = time.monotonic()
    with pytest.raises(TeacherRequestError) as err:
        client._call("POST", "/v1/score", body if isinstance(body, bytes) else dumps(body))
    assert time.monotonic() - t0 < 4, "a 4xx must not be retried"  # one backoff would be 5 s
    assert "HTTP 400" in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b"{not json", r"body: not valid JSON"),
        ([1, 2], r"body: expected a JSON object"),
        ({"input_ids": [[1, 2, 3]], "response_start": [1], "topk": 3}, r"unknown field.*topk"),
        ({"input_ids": [[1, 2, 3], [4, 5]], "response_start": [1]}, r"response_start: expected 2"),
        ({"input_ids": [[1, 2, 3], [4, [5]]], "response_start": [1, 1]}, r"input_ids row 1"),
        ({"input_ids": [[1, 2, 3], [4, 5.5]], "response_start": [1, 1]}, r"input_ids row 1"),
        ({"input_ids": [[1, 2, 3], [4, 999]], "response_start": [1, 1]},
         r"input_ids row 1: token id 999 is out of the vocabulary \[0, 99\)"),
        ({"input_ids": [[1, 2, 3], [4, -1]], "response_start": [1, 1]}, r"input_ids row 1"),
        ({"input_ids": [[1, 2, 3], [4, 5]], "response_start": [1, 2]},
         r"response_start row 1: expected an integer in \[1, 1\], got 2"),
        ({"input_ids": [[1, 2, 3]], "response_start": [0]}, r"response_start row 0"),
        ({"input_ids": [[1, 2, 3]], "response_mask": [[1, 1, 1]]}, r"response_mask row 0"),
        ({"input_ids": [[1, 2, 3]], "response_mask": [[0, 1]]}, r"response_mask row 0"),
        ({"input_ids": [[1, 2, 3]], "response_start": [1], "response_mask": [[0, 1, 1]]},
         r"exactly one of response_start"),
        ({"input_ids": [[1, 2, 3]], "response_start": [1], "top_k": -2}, r"top_k: expected"),
        ({"input_ids": [[1, 2, 3]], "response_start": [1], "top_k": 1.5}, r"top_k: expected"),
        ({"input_ids": [[1] * 513], "response_start": [1]}, r"input_ids row 0: 513 tokens"),
        ({"input_ids": [[1, 2, 3], [4, 5]], "response_start": [1, 1],
          "candidate_ids": [[[1, 2], [3, 4]], [[5]]]},
         r"candidate_ids row 1: every response position needs the same number"),
        ({"input_ids": [[1, 2, 3], [4, 5]], "response_start": [1, 1],
          "candidate_ids": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]},
         r"candidate_ids row 1: expected 1 entries, got 2"),
        ({"input_ids": [[1, 2, 3], [4, 5]], "response_start": [1, 1],
          "candidate_ids": [[[1], [3]], [[99]]]}, r"candidate_ids row 1: token id 99"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_field_and_row(server, body, pattern):
    message = _post(server.url, body)
    assert re.search(pattern, message), message


def test_client_reports_the_batch_rows_of_a_rejected_request(teacher, server):
    _, tok = teacher
    batch = random_batch(4, len(tok), pad=PAD, seed=6)
    cand = candidates(batch, len(tok))
    cand[3, int(batch.response_mask_BT[3].nonzero()[0]), 2] = len(tok) + 2  # a padded row's id
    with pytest.raises(TeacherRequestError, match=r"candidate_ids row \d: token id 101.*rows="):
        HTTPTeacher(server.url).score(batch, candidate_ids_BTC=cand)
    with pytest.raises(ValueError, match="top_k"):
        HTTPTeacher(server.url).score(batch, top_k=-1)


class Flaky(torch.nn.Module):
    """The real model, failing its first ``failures`` forward passes (as on out of memory)."""

    def __init__(self, model, failures: int) -> None:
        super().__init__()
        self.model, self.failures = model, failures

    @property
    def device(self):
        return self.model.device

    def forward(self, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("simulated: CUDA out of memory")
        return self.model(**kwargs)


def test_server_errors_are_retried(teacher, caplog):
    local, tok = teacher
    flaky = LocalTeacher(Flaky(local.model, 2), temperature=TEMPERATURE,
                         max_tokens_per_mb=BUDGET, vocab=len(tok))  # fmt: skip
    batch = random_batch(3, len(tok), pad=PAD, seed=7)
    with serving(build_app(flaky, tok, model_name="flaky")) as s:
        got = HTTPTeacher(s.url, max_retries=2, backoff_s=0.01).score(batch)
        assert_same(got, local.score(batch), batch)
        flaky.model.failures = 5
        with pytest.raises(TeacherUnavailable, match=r"3 attempts.*HTTP 500: teacher failed: "
                           r"RuntimeError: simulated: CUDA out of memory"):  # fmt: skip
            HTTPTeacher(s.url, max_retries=2, backoff_s=0.01).score(batch)


def test_a_stopped_server_raises_teacher_unavailable_in_bounded_time(teacher):
    local, tok = teacher
    batch = random_batch(2, len(tok), pad=PAD, seed=8)
    with serving(build_app(local, tok, model_name="t")) as s:
        remote = HTTPTeacher(s.url, max_retries=3, backoff_s=0.05)
        remote.score(batch)
        s.stop()
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable) as err:
            remote.score(batch)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert s.url in msg and "4 attempts of POST /v1/score" in msg, msg
    assert "Connection refused" in msg or "ConnectionRefusedError" in msg, msg
    assert "kdrl serve-teacher --model" in msg and f"--port {s.url.rsplit(':', 1)[1]}" in msg


def test_a_server_that_never_answers_times_out_and_is_retried():
    with socket.socket() as sock:  # accepts connections (backlog) but never replies
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable, match=r"2 attempts of GET /health.*timed out"):
            HTTPTeacher(url, timeout_s=0.3, max_retries=1, backoff_s=0.01).info()
        assert time.monotonic() - t0 < 5


GOOD = {"logprobs": [[-1.0, -2.0]], "topk_logprobs": [[[-0.5], [-0.25]]], "topk_ids": [[[3], [4]]]}


@pytest.mark.parametrize(
    ("reply", "pattern"),
    [
        (b"<html>Bad Gateway</html>", r"invalid JSON"),
        ({**GOOD, "logprobs": [[-1.0]]}, r"logprobs row 0: expected 2 entries, got 1"),
        ({**GOOD, "logprobs": [[-1.0, "x"]]}, r"logprobs row 0: not a rectangular list"),
        ({**GOOD, "logprobs": [[-1.0, -2.0], [-3.0]]}, r"logprobs: expected 1 entries, got 2"),
        ({k: v for k, v in GOOD.items() if k != "topk_ids"}, r"topk_ids: expected a list"),
        ({**GOOD, "topk_ids": [[[3], [4.5]]]}, r"topk_ids row 0"),
        ({**GOOD, "topk_logprobs": [[[-0.5, -1], [-0.25]]]}, r"topk_logprobs row 0"),
        ({**GOOD, "topk_logprobs": [[[-0.5] * 4, [-0.25] * 4]]}, r"expected 1 .. 2 values"),
    ],
)  # fmt: skip
def test_malformed_responses_name_the_field(teacher, reply, pattern):
    """A loopback server that answers ``/v1/score`` with the given (broken) body."""
    _, tok = teacher
    health = {"status": "ok", "api_version": 1, "model": "broken", "vocab_size": len(tok),
              "temperature": 1.0, "max_tokens_per_mb": 100,
              "tokenizer": {"vocab_size": len(tok), "fingerprint": "x"}}  # fmt: skip

    async def get_health(request):
        return Response(dumps(health), media_type="application/json")

    async def post_score(request):
        return Response(reply if isinstance(reply, bytes) else dumps(reply))

    app = Starlette(routes=[Route("/health", get_health), Route("/v1/score", post_score,
                                                                 methods=["POST"])])  # fmt: skip
    batch = batch_of([([5], [6, 7])], pad=PAD)
    with serving(app) as s, pytest.raises(TeacherResponseError, match=pattern):
        HTTPTeacher(s.url).score(batch, top_k=2)


def test_check_refuses_another_tokenizer_vocabulary_or_temperature(teacher, server):
    _, tok = teacher
    remote = HTTPTeacher(server.url)
    info = remote.check(len(tok), tok, temperature=TEMPERATURE)
    assert info["model"] == "tiny-teacher" and info["max_tokens_per_mb"] == BUDGET
    assert info["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    other = char_tokenizer(chars="abcdefghijklmnopqrstuvwxyz0123456789 ")
    with pytest.raises(TeacherMismatch, match=r"tokenizer differs.*fingerprint"):
        remote.check(len(tok), other)
    # Same size, one token renamed: only the fingerprint can tell.
    swapped = char_tokenizer(chars=DEFAULT_CHARS[::-1])
    assert len(swapped) == len(tok)
    with pytest.raises(TeacherMismatch, match="fingerprint"):
        remote.check(len(tok), swapped)
    with pytest.raises(TeacherMismatch, match=r"--vocab 104"):
        remote.check(len(tok) + 5, tok)
    with pytest.raises(TeacherMismatch, match=r"--temperature 1.0"):
        remote.check(len(tok), tok, temperature=1.0)


# ---- the command line ----------------------------------------------------------------------


@pytest.mark.slow
def test_serve_teacher_command_end_to_end(teacher, tiny_pair, tmp_path):
    """``kdrl serve-teacher`` in its own process: same scores as in-process, debug request
    logs, and a clear error once it is gone."""
    local, tok = teacher
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdrl", "serve-teacher", "--model", str(tiny_pair[1]),
         "--port", str(port), "--temperature", str(TEMPERATURE), "--vocab", str(len(tok)),
         "--max-tokens-per-mb", str(BUDGET), "--log-level", "debug",
         # The local reference is float32; `auto` is bfloat16 on a CPU with native bf16.
         "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        remote = HTTPTeacher(f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.05)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                remote.check(len(tok), tok, temperature=TEMPERATURE)
                break
            except TeacherUnavailable:
                assert time.monotonic() < deadline, "server did not come up in 60 s"
                time.sleep(0.2)
        batch = random_batch(9, len(tok), pad=PAD, seed=9)
        cand = candidates(batch, len(tok))
        # Bit-identical is a fair promise only with the same kernels and the same thread count
        # on both sides: the server runs with OMP_NUM_THREADS=1, so the local reference does
        # too (with two threads the reduction order differs and the last bits may too).
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            want = local.score(batch, top_k=3, candidate_ids_BTC=cand)
        finally:
            torch.set_num_threads(saved_threads)
        assert_same(remote.score(batch, top_k=3, candidate_ids_BTC=cand), want, batch)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "scored 9 sequences" in text and "top_k=3, candidates=4" in text, text
    with pytest.raises(TeacherUnavailable, match=f"127.0.0.1:{port}.*kdrl serve-teacher"):
        remote.score(batch)


def test_serve_teacher_without_the_extra_says_how_to_install(monkeypatch, capsys, tiny_pair):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve-teacher", "--model", str(tiny_pair[1])]) == 2
    assert "pip install 'kdrl[serve]'" in capsys.readouterr().err


def test_health_over_plain_http(server):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "ok" and body["vocab_size"] == 99 and body["max_positions"] == 512
