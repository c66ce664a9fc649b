"""The vLLM (OpenAI-compatible) teacher.

``test_against_a_real_vllm_server`` starts a real ``vllm serve`` (marked slow; skipped unless the
Python in ``KDRL_VLLM_PYTHON``, default this one, can import vllm) and compares
:class:`OpenAITeacher` with :class:`LocalTeacher` on the same tiny model. With
``KDRL_RECORD_VLLM=1`` it also records the exchange into ``tests/data/vllm_prompt_logprobs.json``.

The fast tests replay that recording (real vLLM 0.32 responses, served by a small loopback ASGI
app that also checks the request is the recorded one) and compare with ``LocalTeacher`` on the
same model, which is rebuilt from its seed; then they damage the replies to check the parser.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kdrl.teacher import LocalTeacher
from kdrl.teacher_http import TeacherRequestError, TeacherResponseError, TeacherUnavailable
from kdrl.teacher_openai import OpenAITeacher
from kdrl.teacher_wire import dumps
from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm
from loopback import free_port, random_batch, serving

RECORDING = Path(__file__).parent / "data" / "vllm_prompt_logprobs.json"
VLLM_PYTHON = os.environ.get("KDRL_VLLM_PYTHON", sys.executable)
NAME, TOP_K, ROWS, PER_REQUEST, PAD = "tiny", 5, 7, 4, 0
TOLERANCE = 1e-5
"""vLLM's CPU kernels vs the Hugging Face forward, both float32: measured 4.8e-7 at most."""

# One torch thread: these tests start servers beside the model; two processes spinning on
# both cores of this machine would slow each other down.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama that vLLM's CPU attention accepts (head size 32), with 5 padded rows."""
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=64, layers=2, heads=2, vocab_rows=len(tok) + 5, seed=2)
    return save_tiny(tmp_path_factory.mktemp("vllm_teacher") / "teacher", tok, model)


@pytest.fixture(scope="module")
def local(model_dir):
    """In-process scores normalised as vLLM does: over every output row, at temperature 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = model.get_output_embeddings().weight.shape[0]
    return LocalTeacher(model, temperature=1.0, max_tokens_per_mb=4096, vocab=rows)


def the_batch():
    return random_batch(ROWS, len(char_tokenizer()), pad=PAD, seed=21, max_prompt=10)


def assert_matches_local(got, want, batch, top_k: int):
    r = batch.response_mask_BT
    assert (got.logprobs_BT[~r] == 0).all()
    torch.testing.assert_close(got.logprobs_BT, want.logprobs_BT, atol=TOLERANCE, rtol=0)
    if top_k:
        torch.testing.assert_close(
            got.topk_logprobs_BTK[r], want.topk_logprobs_BTK[r], atol=TOLERANCE, rtol=0
        )
        assert torch.equal(got.topk_ids_BTK[r], want.topk_ids_BTK[r])


# ---- a real vLLM server --------------------------------------------------------------------


def _has_vllm() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([VLLM_PYTHON, "-c", probe], check=False).returncode == 0


class Recorder:
    """Wraps the client's transport and keeps every request and reply."""

    def __init__(self, http) -> None:
        self.http, self.exchanges = http, []

    def post(self, path, body):
        reply = self.http.post(path, body)
        self.exchanges.append({"path": path, "request": body, "response": reply})
        return reply

    def get(self, path):
        reply = self.http.get(path)
        self.exchanges.append({"path": path, "request": None, "response": reply})
        return reply


@pytest.mark.slow
@pytest.mark.skipif(not _has_vllm(), reason=f"vllm is not importable by {VLLM_PYTHON}")
def test_against_a_real_vllm_server(model_dir, local, tmp_path):
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--served-model-name", NAME, "--dtype", "float32", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        teacher = OpenAITeacher(url, NAME, max_retries=0, max_sequences_per_request=PER_REQUEST)
        deadline, t0 = time.monotonic() + 300, time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-5000:]
            try:
                info = teacher.info()
                break
            except TeacherUnavailable:
                assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(1)
        print(f"vllm serve ready in {time.monotonic() - t0:.1f} s")
        assert info["max_model_len"] == 512
        teacher.http = Recorder(teacher.http)
        batch = the_batch()
        for top_k in (0, TOP_K):
            t1 = time.monotonic()
            got = teacher.score(batch, top_k=top_k)
            diff = (got.logprobs_BT - local.score(batch).logprobs_BT).abs().max()
            print(f"top_k={top_k}: {time.monotonic() - t1:.2f} s, max |vLLM - local| = {diff:.2e}")
            assert_matches_local(got, local.score(batch, top_k=top_k), batch, top_k)
        # vLLM normalises over every output row; cutting the 5 padded rows changes the values.
        cut = LocalTeacher(local.model, temperature=1.0, max_tokens_per_mb=4096, vocab=99)
        assert (got.logprobs_BT - cut.score(batch).logprobs_BT).abs().max() > 100 * TOLERANCE
        with pytest.raises(TeacherRequestError, match=r"max allowed: 20.*set teacher.top_k"):
            teacher.score(batch, top_k=21)
        bad = the_batch()
        bad.input_ids_BT[1, 2] = 104
        with pytest.raises(TeacherRequestError, match=r"HTTP 400.*out of vocabulary"):
            teacher.score(bad)
        if os.environ.get("KDRL_RECORD_VLLM"):
            exchanges = teacher.http.exchanges
            RECORDING.write_text(json.dumps({
                "note": "Recorded from vllm-cpu 0.32.0 (`python -m vllm.entrypoints.openai."
                        "api_server --dtype float32`) serving the tiny model of "
                        "tests/test_teacher_openai.py by KDRL_RECORD_VLLM=1 pytest -m slow "
                        "tests/test_teacher_openai.py",
                "models": teacher.http.http.get("/v1/models"),
                "completions": [e for e in exchanges if e["path"] == "/v1/completions"],
            }) + "\n")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    with pytest.raises(TeacherUnavailable, match=rf"{url}.*vllm serve {NAME}"):
        teacher.http = teacher.http.http
        teacher.score(batch)


# ---- recorded vLLM replies on a loopback server --------------------------------------------


@pytest.fixture(scope="module")
def recording() -> dict:
    return json.loads(RECORDING.read_text())


def replay(recording: dict, *, damage=None):
    """An app that answers the recorded requests with the recorded (or damaged) replies."""
    calls = []

    async def models(request: Request) -> Response:
        return Response(dumps(recording["models"]), media_type="application/json")

    async def completions(request: Request) -> Response:
        body = json.loads(await request.body())
        calls.append(body)
        for ex in recording["completions"]:
            if ex["request"] == body:
                reply = ex["response"] if damage is None else damage(copy.deepcopy(ex["response"]))
                return Response(dumps(reply), media_type="application/json")
        error = {"error": {"message": "not a recorded request", "type": "BadRequestError",
                           "code": 400}}  # fmt: skip
        return Response(dumps(error), status_code=400, media_type="application/json")

    app = Starlette(routes=[Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"])])  # fmt: skip
    return app, calls


@pytest.mark.parametrize("top_k", [0, TOP_K])
def test_recorded_vllm_replies_match_local_scores(recording, local, top_k):
    app, calls = replay(recording)
    batch = the_batch()
    with serving(app) as s:
        teacher = OpenAITeacher(s.url, NAME, max_sequences_per_request=PER_REQUEST)
        assert teacher.info()["id"] == NAME
        got = teacher.score(batch, top_k=top_k)
    assert len(calls) == 2  # the requests the client sends are exactly the recorded ones
    assert_matches_local(got, local.score(batch, top_k=top_k), batch, top_k)
    # Independently of the parser: the recorded value of each response token, read by hand.
    for first, call in zip((0, PER_REQUEST), calls, strict=True):
        reply = next(e["response"] for e in recording["completions"] if e["request"] == call)
        for choice in reply["choices"]:
            b = first + choice["index"]
            for t in batch.response_mask_BT[b].nonzero().squeeze(1).tolist():
                want = choice["prompt_logprobs"][t][str(int(batch.input_ids_BT[b, t]))]["logprob"]
                assert got.logprobs_BT[b, t].item() == want


def _first_response_entry(reply: dict) -> dict:
    """Choice 0's entry at its first response position of ``the_batch()``."""
    t = int(the_batch().response_mask_BT[0].nonzero()[0])
    return reply["choices"][0]["prompt_logprobs"][t]


def _drop_own_token(reply):
    entry = _first_response_entry(reply)
    own = next(iter(entry))  # vLLM lists the prompt's own token first
    entry[str((int(own) + 1) % 99)] = entry.pop(own)
    return reply


def _bare_numbers(reply):  # some servers give {id: logprob}; accepted
    for c in reply["choices"]:
        c["prompt_logprobs"] = [e and {k: v["logprob"] for k, v in e.items()}
                                for e in c["prompt_logprobs"]]  # fmt: skip
    return reply


def _shuffle(reply):  # choices in any order are put back by "index"
    reply["choices"].reverse()
    return reply


def test_reply_variants_that_are_fine(recording, local):
    batch = the_batch()
    for damage in (_bare_numbers, _shuffle):
        with serving(replay(recording, damage=damage)[0]) as s:
            got = OpenAITeacher(s.url, NAME, max_sequences_per_request=PER_REQUEST).score(batch)
        assert_matches_local(got, local.score(batch), batch, 0)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_drop_own_token, r"choice 0 \(batch row 0\) position \d+: no log-prob for its token"),
        (lambda r: {**r, "choices": r["choices"][:-1]}, r"indices \[0, 1, 2\], expected 0 \.\. 3"),
        (lambda r: {"choices": [{"index": 0, "text": "x"}]}, r"prompt_logprobs.*vLLM"),
        (lambda r: {"detail": "nope"}, r"no 'choices' list"),
        (lambda r: [r["choices"][0]["prompt_logprobs"].pop(), r][1], r"prompt_logprobs for a"),
        (lambda r: [_first_response_entry(r).update({"x1": -1.0}), r][1], r"'x1' is not an int"),
        (lambda r: [_first_response_entry(r).update({"5": {"logprob": None}}), r][1],
         r"token 5: log-prob None is not a number"),
    ],
)  # fmt: skip
def test_damaged_replies_name_what_is_wrong(recording, damage, pattern):
    with serving(replay(recording, damage=damage)[0]) as s:
        teacher = OpenAITeacher(s.url, NAME, max_sequences_per_request=PER_REQUEST)
        with pytest.raises(TeacherResponseError, match=pattern):
            teacher.score(the_batch())


def test_what_this_backend_refuses(recording):
    with pytest.raises(ValueError, match=r"temperature 1 only.*kdrl serve-teacher --temperature"):
        OpenAITeacher("http://127.0.0.1:1", NAME, temperature=0.7)
    with serving(replay(recording)[0]) as s:
        teacher = OpenAITeacher(s.url, NAME)
        with pytest.raises(ValueError, match=r"candidate_ids_BTC.*kdrl serve-teacher"):
            teacher.score(the_batch(), candidate_ids_BTC=torch.zeros(ROWS, 3, 1).long())
        with pytest.raises(TeacherResponseError, match=r"serves \['tiny'\], not 'other'"):
            OpenAITeacher(s.url, "other").info()
        # A request the server rejects (here: not recorded) is a 4xx with vLLM's message.
        with pytest.raises(TeacherRequestError, match=r"HTTP 400.*not a recorded request"):
            teacher.score(the_batch(), top_k=2)
