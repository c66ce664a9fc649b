"""SIGTERM / SIGINT during training: the run stops at a safe point, saves, exits 0, and
``--resume`` then finishes it exactly as a run that never stopped (weights, losses, data
position, RNG). Real signals throughout, each at a known point of the run, never raced against
the machine's speed: sent to a real ``python -m kdrl train`` process while its reward function
holds it at a known call, or sent by the run itself (its reward function, ``signal_rewards``, or
the sampler at a given token)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import kdrl
import signal_rewards
from kdrl.checkpoint import checkpoint_path, find_latest_checkpoint, load_trainer_state
from kdrl.cli import main
from kdrl.config import load_config
from kdrl.distributed import SINGLE
from kdrl.metrics import read_metrics
from kdrl.rollout import _SampleAndRecord
from kdrl.stop import StepAbandoned, Stopped, abandon_point, handle_stop_signals
from kdrl.train import train

TESTS = Path(__file__).parent
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    # The kdrl under test, and signal_rewards for reward.fn.
    "PYTHONPATH": os.pathsep.join([str(Path(kdrl.__file__).parents[1]), str(TESTS),
                                   os.environ.get("PYTHONPATH", "")]),
}  # fmt: skip
DEADLINE_S = 300  # generous: this machine may be slow and busy
# Short steps, enough of them that a signal after step 2 lands mid-run.
MID_RUN = ("rollout.max_new_tokens=48", "train.max_steps=10", "train.save_every_steps=3")
# Rollout is nearly all of a step: 16 answers of up to 500 tokens each.
LONG_ROLLOUT = ("rollout.max_new_tokens=500", "train.max_steps=3", "train.batch_size=4",
                "rollout.n_samples=4")  # fmt: skip
# Every step saved, so a stopped run's checkpoint can be compared with the same step's here.
SAVE_ALL = ("train.save_every_steps=1", "train.keep_checkpoints=100")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    """Training prompts, and held-out prompts whose answers start with ``x`` (so that
    ``signal_rewards`` can tell evaluation calls from training calls)."""
    root = tmp_path_factory.mktemp("signal_prompts")
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    train_file, eval_file = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [{"prompt": r["prompt"], "answer": "x" + r["answer"]} for r in rows[:2]]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return train_file, eval_file


def overrides(tiny_pair, prompts, out: Path, *extra: str) -> list[str]:
    student, teacher = tiny_pair
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts[0]}",
        "data.answer_field=answer", "reward.fn=signal_rewards:exact_match",
        "data.chat_template=false", f"train.output_dir={out}", "train.batch_size=2",
        "rollout.n_samples=2", "optim.lr=1e-3", "teacher.distill_loss_weight=0.5",
        "train.tensorboard=false", "train.threads=1", *extra,
    ]  # fmt: skip


def with_eval(prompts) -> tuple[str, ...]:
    return (f"eval.path={prompts[1]}", "eval.split=train", "eval.every_steps=2",
            "eval.temperature=1.0", "rollout.max_new_tokens=16", "train.max_steps=4")  # fmt: skip


def uninterrupted(tiny_pair, prompts, out: Path, *extra: str) -> Path:
    signal_rewards.reset()
    train(load_config(None, overrides(tiny_pair, prompts, out, *extra, *SAVE_ALL)))
    return out


@pytest.fixture(scope="module")
def baseline_mid(tiny_pair, prompts, tmp_path_factory, one_thread) -> Path:
    return uninterrupted(tiny_pair, prompts, tmp_path_factory.mktemp("mid") / "run", *MID_RUN)


@pytest.fixture(scope="module")
def baseline_long(tiny_pair, prompts, tmp_path_factory, one_thread) -> Path:
    return uninterrupted(tiny_pair, prompts, tmp_path_factory.mktemp("long") / "run", *LONG_ROLLOUT)


@pytest.fixture(scope="module")
def baseline_eval(tiny_pair, prompts, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    return uninterrupted(tiny_pair, prompts, out, *with_eval(prompts))


# --- helpers ---------------------------------------------------------------------------------


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []  # a torn last line is skipped
    return rows[-1]["step"] if rows else -1


class Trainer:
    """A ``python -m kdrl train`` process, its output in a file."""

    def __init__(self, args: list[str], log: Path, env=None, launcher=("kdrl",)) -> None:
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *launcher, "train", *args], env={**ENV, **(env or {})},
                stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            code = self.proc.poll()
            if code is not None:
                pytest.fail(f"kdrl train exited ({code}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {DEADLINE_S} s:\n{self.output()[-4000:]}")
            time.sleep(0.02)

    def exit_code(self) -> int:
        try:
            return self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kdrl train still running {DEADLINE_S} s later:\n{self.output()[-4000:]}")


@contextmanager
def trainer(args: list[str], log: Path, env=None, launcher=("kdrl",)):
    t = Trainer(args, log, env, launcher)
    try:
        yield t
    finally:
        if t.proc.poll() is None:  # a failed test must not leave it running
            t.proc.kill()
            t.proc.wait()


def same(a, b) -> bool:
    """Deep equality of nested dicts/lists/tuples of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights, optimizer, schedule, data position and RNG states all equal."""
    wa, wb = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_trainer_state(got), load_trainer_state(want)
    for key in ("step", "sampler", "scheduler", "optimizer", "rng"):
        assert same(sa[key], sb[key]), f"{got} and {want} differ in {key}"


def assert_same_run(got: Path, want: Path, steps: int) -> None:
    assert_same_checkpoint(checkpoint_path(got, steps), checkpoint_path(want, steps))
    rows_got, rows_want = read_metrics(got), read_metrics(want)
    assert [r["step"] for r in rows_got] == [r["step"] for r in rows_want]
    for a, b in zip(rows_got, rows_want, strict=True):
        for key in ("loss/total", "reward/mean", "rollout/reverse_kl", "optim/grad_norm"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


def resume(tiny_pair, prompts, out: Path, *extra: str) -> None:
    """``kdrl train ... --resume`` to the end (in this process: no second start-up)."""
    signal_rewards.reset()
    assert main(["train", *overrides(tiny_pair, prompts, out, *extra), "--resume"]) == 0


# --- a signal from outside ---------------------------------------------------------------------
# The signal is sent while the run is known to be busy at a given reward call (the run itself
# holds there until the test lets it go), never after a sleep: a fast machine would finish all
# ten steps before a polling test noticed step 2, a slow one might still be starting.

REWARDS_PER_STEP = 4  # train.batch_size=2 x rollout.n_samples=2
IN_STEP_3 = 2 * REWARDS_PER_STEP + 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_saves_exits_0_and_resume_matches_the_uninterrupted_run(
    signum, tiny_pair, prompts, baseline_mid, tmp_path
):
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()  # step 3's first reward call waits until the file goes
    env = {signal_rewards.HOLD_ENV: str(hold), signal_rewards.HOLD_AT_ENV: str(IN_STEP_3)}
    with trainer(overrides(tiny_pair, prompts, out, *MID_RUN), tmp_path / "log", env=env) as t:
        t.wait_for(Path(f"{hold}.held").exists, "the reward function to hold in step 3")
        t.proc.send_signal(signum)
        t.wait_for(lambda: "send it again to exit at once" in t.output(), "the stop message")
        hold.unlink()
        code = t.exit_code()
    text = t.output()
    assert code == 0, text[-4000:]
    saved = find_latest_checkpoint(out)  # hashes verified
    assert saved == checkpoint_path(out, 2), text[-4000:]
    assert f"{signum.name} received: stopping at the next safe point" in text
    # Signalled before its update, step 3 leaves no trace.
    assert "step 3 abandoned before its update" in text, text[-4000:]
    assert f"stopped by {signum.name} after step 2 of 10" in text
    assert "--resume" in text
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert_same_checkpoint(saved, checkpoint_path(baseline_mid, 2))
    resume(tiny_pair, prompts, out, *MID_RUN)
    assert_same_run(out, baseline_mid, 10)


@pytest.mark.slow
def test_a_signal_during_rollout_abandons_the_step_and_resume_redoes_it(
    tiny_pair, prompts, baseline_long, tmp_path, monkeypatch, caplog
):
    # A real SIGTERM, sent from inside the sampler at the 5th generated token of step 2: the
    # stop request cuts generation short, the step is dropped, and resume redoes it.
    real_init, real_call = _SampleAndRecord.__init__, _SampleAndRecord.__call__
    made = []

    def counting_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)
        self.calls = 0

    def signalling_call(self, input_ids, scores):
        self.calls += 1
        if len(made) == 2 and self is made[1] and self.calls == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, input_ids, scores)

    monkeypatch.setattr(_SampleAndRecord, "__init__", counting_init)
    monkeypatch.setattr(_SampleAndRecord, "__call__", signalling_call)
    out = tmp_path / "run"
    signal_rewards.reset()
    with caplog.at_level(logging.INFO, logger="kdrl"), pytest.raises(Stopped) as stopped:
        train(load_config(None, overrides(tiny_pair, prompts, out, *LONG_ROLLOUT)))
    assert made[1].calls < 100, "generation went on after the signal"
    assert "step 2 abandoned before its update" in caplog.text
    assert "stopped by SIGTERM after step 1 of 3" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1]
    saved = stopped.value.checkpoint
    assert saved == checkpoint_path(out, 1) == find_latest_checkpoint(out)
    # Data position and RNG as they were when step 2 began: what step 1's save holds.
    assert_same_checkpoint(saved, checkpoint_path(baseline_long, 1))
    monkeypatch.undo()
    resume(tiny_pair, prompts, out, *LONG_ROLLOUT)
    assert_same_run(out, baseline_long, 3)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_the_last_checkpoint_stays_loadable(
    tiny_pair, prompts, tmp_path
):
    out, hold = tmp_path / "run", tmp_path / "hold"
    args = overrides(tiny_pair, prompts, out, *MID_RUN, "train.save_every_steps=1")
    hold.touch()  # step 3's first reward call waits (up to 300 s) until the file goes
    env = {signal_rewards.HOLD_ENV: str(hold), signal_rewards.HOLD_AT_ENV: str(IN_STEP_3)}
    with trainer(args, tmp_path / "log", env=env) as t:
        t.wait_for(Path(f"{hold}.held").exists, "the reward function to hold in step 3")
        t.proc.send_signal(signal.SIGTERM)
        t.wait_for(lambda: "send it again to exit at once" in t.output(), "the stop message")
        sent = time.monotonic()
        t.proc.send_signal(signal.SIGTERM)
        code = t.exit_code()
        took = time.monotonic() - sent
    hold.unlink()
    text = t.output()
    assert code == -signal.SIGTERM, text[-4000:]
    assert took < 60, took  # not after the hold ends
    assert "stopped by" not in text
    saved = find_latest_checkpoint(out)  # hashes verified
    assert saved == checkpoint_path(out, 2), text[-4000:]
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert sum(p.numel() for p in model.parameters()) > 0


TORCHRUN = ("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrl")


@pytest.fixture(scope="module")
def baseline_torchrun(tiny_pair, prompts, tmp_path_factory) -> Path:
    """The same 10 steps under torchrun (2 ranks, DDP, one thread each), never stopped."""
    root = tmp_path_factory.mktemp("torchrun")
    out = root / "run"
    args = overrides(tiny_pair, prompts, out, *MID_RUN, "train.parallel=ddp", *SAVE_ALL)
    with trainer(args, root / "log", launcher=TORCHRUN) as t:
        assert t.exit_code() == 0, t.output()[-4000:]
    return out


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(
    tiny_pair, prompts, baseline_torchrun, tmp_path
):
    out = tmp_path / "run"
    args = overrides(tiny_pair, prompts, out, *MID_RUN, "train.parallel=ddp")
    # Rank 1 (2 reward calls a step) sends itself SIGTERM at its 5th reward call, in step 3;
    # rank 0, which writes the files, is never signalled.
    env = {signal_rewards.SIGNAL_AT_ENV: ":5", signal_rewards.SIGNAL_RANK_ENV: "1"}
    with trainer(args, tmp_path / "log", env=env, launcher=TORCHRUN) as t:
        code = t.exit_code()
    text = t.output()
    assert code == 0, text[-4000:]
    saved = find_latest_checkpoint(out)
    assert saved == checkpoint_path(out, 3), text[-4000:]
    # Rank 0 learnt of the signal through the step-boundary all-reduce.
    assert "stopped by SIGTERM after step 3 of 10" in text, text[-4000:]
    assert "abandoned" not in text  # ranks always finish their step
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert_same_checkpoint(saved, checkpoint_path(baseline_torchrun, 3))
    with trainer([*args, "--resume"], tmp_path / "log2", launcher=TORCHRUN) as t:
        assert t.exit_code() == 0, t.output()[-4000:]
    # Same launcher, world size and thread count as the baseline: the same reduction order,
    # so the resumed run must equal it bit for bit. (Against one process it is equal only up
    # to rounding, which ten steps of sampling amplify: loss/total differed by 5.8e-4 relative
    # at step 4 on an AVX-512 machine, 0 on an AVX2 one.)
    assert_same_run(out, baseline_torchrun, 10)


# --- a signal at an exact point, sent by the run itself -----------------------------------------


@pytest.mark.slow
def test_a_stop_before_the_update_rewinds_the_step(
    tiny_pair, prompts, baseline_mid, tmp_path, caplog
):
    out = tmp_path / "run"
    signal_rewards.reset(("", 10))  # 4 reward calls a step: the 10th is in step 3
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.INFO, logger="kdrl"), pytest.raises(Stopped) as stopped:
        train(load_config(None, overrides(tiny_pair, prompts, out, *MID_RUN)))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    final = stopped.value.checkpoint
    assert final == checkpoint_path(out, 2) and stopped.value.step == 2
    assert "step 3 abandoned before its update" in caplog.text
    assert "stopped by SIGTERM after step 2 of 10" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert_same_checkpoint(final, checkpoint_path(baseline_mid, 2))
    resume(tiny_pair, prompts, out, *MID_RUN)
    assert_same_run(out, baseline_mid, 10)


@pytest.mark.slow
def test_a_stop_during_evaluation_keeps_the_step_and_skips_its_evaluation(
    tiny_pair, prompts, baseline_eval, tmp_path, caplog
):
    out, extra = tmp_path / "run", with_eval(prompts)
    # Held-out reward calls: 2 for the teacher's reference, 2 sampled and 2 greedy answers at
    # step 0, then the same at step 2: the 7th is in step 2's evaluation.
    signal_rewards.reset(("x", 7))
    with caplog.at_level(logging.INFO, logger="kdrl"), pytest.raises(Stopped) as stopped:
        train(load_config(None, overrides(tiny_pair, prompts, out, *extra)))
    final = stopped.value.checkpoint
    assert final == checkpoint_path(out, 2)
    assert "evaluation at step 2 skipped" in caplog.text
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" not in rows[2]
    assert "loss/total" in rows[2]  # the step itself was kept
    assert_same_checkpoint(final, checkpoint_path(baseline_eval, 2))
    resume(tiny_pair, prompts, out, *extra)
    assert_same_run(out, baseline_eval, 4)
    last, want = read_metrics(out)[-1], read_metrics(baseline_eval)[-1]
    assert last["eval/reverse_kl"] == want["eval/reverse_kl"]


@pytest.mark.slow
def test_a_stop_before_the_first_step_keeps_nothing_and_the_same_command_starts_over(
    tiny_pair, prompts, baseline_eval, tmp_path, caplog
):
    out, extra = tmp_path / "run", with_eval(prompts)
    args = overrides(tiny_pair, prompts, out, *extra)
    signal_rewards.reset(("x", 1))  # while the teacher's reference answers are scored
    with caplog.at_level(logging.INFO, logger="kdrl"), pytest.raises(Stopped) as stopped:
        train(load_config(None, args))
    assert stopped.value.checkpoint is None and stopped.value.step == 0
    assert "before the first step: nothing to save" in caplog.text
    assert find_latest_checkpoint(out) is None and not (out / "metrics.jsonl").exists()
    signal_rewards.reset()
    assert main(["train", *args]) == 0  # not refused as "already holds a run"
    assert_same_run(out, baseline_eval, 4)
    assert read_metrics(out)[0] == read_metrics(baseline_eval)[0]  # the first evaluation


# --- the handler itself --------------------------------------------------------------------------


def test_the_handler_is_installed_for_the_block_only_and_a_second_signal_is_left_default():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with handle_stop_signals(abandon=True, announce=False) as stop:
        abandon_point()  # nothing requested yet
        assert not stop.agreed(SINGLE)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.name == "SIGINT" and stop.agreed(SINGLE)
        with pytest.raises(StepAbandoned):
            abandon_point()
        # The next signal would end the process at once.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before
    abandon_point()  # no request outside the block


def test_a_run_that_may_not_abandon_only_stops_between_steps():
    with handle_stop_signals(abandon=False, announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.agreed(SINGLE)
        abandon_point()  # under torchrun a step is always finished


def test_outside_the_main_thread_the_handlers_are_left_alone():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with handle_stop_signals(abandon=True, announce=False) as stop:
            seen.append((signal.getsignal(signal.SIGTERM), stop.requested))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [(before, False)]
