"""Training against a teacher served by a real `kdrl serve-teacher` process on loopback: the
same losses as the in-process teacher, and a clean stop (checkpoints intact, resumable) when
the server dies mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kdrl.checkpoint import find_latest_checkpoint
from kdrl.config import load_config
from kdrl.metrics import read_metrics
from kdrl.tiny import char_tokenizer
from kdrl.train import train
from loopback import free_port

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_server(teacher: Path, port: int, die_when: Path | None = None) -> subprocess.Popen:
    """``kdrl serve-teacher`` on loopback; with ``die_when``, the same app that vanishes at the
    first scoring request once that path exists (``dying_teacher_server.py``)."""
    # The tiny teacher pads its embedding by 5 rows; in-process scoring normalises over the
    # student's rows, so the server is told the same.
    vocab = str(len(char_tokenizer()))
    if die_when is None:
        cmd = [sys.executable, "-m", "kdrl", "serve-teacher", "--model", str(teacher),
               "--port", str(port), "--vocab", vocab, "--log-level", "warning"]  # fmt: skip
    else:
        cmd = [sys.executable, str(TESTS / "dying_teacher_server.py"), "--model", str(teacher),
               "--port", str(port), "--vocab", vocab, "--die-when", str(die_when)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("teacher server did not start in 60 s")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(tiny_pair, prompts_file, out: Path, *extra: str) -> list[str]:
    student, _ = tiny_pair
    return [
        f"student.path={student}", f"data.path={prompts_file}", "data.answer_field=answer",
        "reward.fn=exact_match", "data.chat_template=false", f"train.output_dir={out}",
        "train.batch_size=2", "rollout.n_samples=2", "rollout.max_new_tokens=8",
        "optim.lr=1e-3", "train.tensorboard=false", "teacher.distill_loss_weight=0.5",
        "train.threads=1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_served_teacher_gives_the_in_process_losses(tiny_pair, prompts_file, tmp_path):
    port = free_port()
    server = start_server(tiny_pair[1], port)
    try:
        url = f"teacher.url=http://127.0.0.1:{port}"
        remote = overrides(tiny_pair, prompts_file, tmp_path / "http", "train.max_steps=3",
                           "teacher.backend=http", url)  # fmt: skip
        train(load_config(None, remote))
    finally:
        server.terminate()
        server.wait(timeout=30)
    local = overrides(tiny_pair, prompts_file, tmp_path / "local", "train.max_steps=3",
                      f"teacher.path={tiny_pair[1]}")  # fmt: skip
    train(load_config(None, local))
    a = read_metrics(tmp_path / "local" / "metrics.jsonl")
    b = read_metrics(tmp_path / "http" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    # Bit for bit: the server and the trainer run the same scoring code in the same dtype on
    # one thread each (OMP_NUM_THREADS=1, train.threads=1), and JSON carries float32 exactly.
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "loss/kd", "rollout/reverse_kl", "optim/grad_norm"):
            assert rb[key] == ra[key], (ra["step"], key)


@pytest.mark.slow
def test_server_gone_mid_run_stops_cleanly_and_resumes(tiny_pair, prompts_file, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"

    def args(max_steps: int) -> list[str]:
        return overrides(tiny_pair, prompts_file, out, f"train.max_steps={max_steps}",
                         "train.save_every_steps=1", "teacher.backend=http", f"teacher.url={url}",
                         "teacher.max_retries=2", "teacher.timeout_s=5")  # fmt: skip

    # The server answers steps 1 and 2 and vanishes at step 3's scoring request, the moment
    # the second checkpoint exists (the trainer writes it before step 3 begins): a fault placed
    # by the run's own progress, whatever the machine's speed. 40 steps asked, 12 possible.
    server = start_server(tiny_pair[1], port, die_when=out / "checkpoints" / "step-00000002")
    cmd = [sys.executable, "-m", "kdrl", "train", *args(40)]
    trainer = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        _, stderr = trainer.communicate(timeout=300)
        server.wait(timeout=30)
    finally:
        for proc in (server, trainer):
            if proc.poll() is None:
                proc.kill()
    assert server.returncode == 137, "the server was never asked to score step 3"
    assert trainer.returncode == 1, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert url in last_line and "serve-teacher" in last_line, stderr[-2000:]
    latest = find_latest_checkpoint(out)
    assert latest is not None and latest.name == "step-00000002"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    # Once the server is back, --resume continues from the last checkpoint.
    server = start_server(tiny_pair[1], port)
    try:
        done = int(latest.name.split("-")[1])
        proc = subprocess.run([sys.executable, "-m", "kdrl", "train", *args(done + 1), "--resume"],
                              env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert find_latest_checkpoint(out).name == f"step-{done + 1:08d}"
