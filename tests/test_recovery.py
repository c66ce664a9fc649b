"""Runs that can always be continued or started over: an error after training started keeps a
checkpoint of the last completed step (``--resume`` continues once the cause is fixed), a
folder left with no complete checkpoint can be started over with ``--restart``, and overrides
may come in any order around the options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdrl
import signal_rewards
from kdrl.checkpoint import checkpoint_path, find_latest_checkpoint
from kdrl.cli import main, parse
from kdrl.metrics import read_metrics
from kdrl.report import write_report
from kdrl.run_dir import read_status

TESTS = Path(__file__).parent
# kdrl tries the reward on its first 3 rows (6 calls) before training, then 4 completions a step
# (2 prompts x 2 samples): calls 7-10 are step 1's, 15-18 step 3's.
FLAKY_REWARD = """
from pathlib import Path

BROKEN = Path(__file__).with_name("broken")
FROM_CALL = {from_call}
calls = 0


def reward(completion, answer):
    global calls
    calls += 1
    if calls >= FROM_CALL and BROKEN.exists():
        raise ZeroDivisionError("the reward's own bug")
    return float(completion.strip() == answer)
"""


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(tiny_pair, prompts_file, out: Path, *extra: str) -> list[str]:
    student, teacher = tiny_pair
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts_file}",
        "data.answer_field=answer", "reward.fn=exact_match", "data.chat_template=false",
        f"train.output_dir={out}", "train.batch_size=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=8", "optim.lr=1e-3", "train.tensorboard=false",
        "train.threads=1", *extra,
    ]  # fmt: skip


def flaky_reward(tmp_path: Path, monkeypatch, from_call: int) -> str:
    """A reward module that raises from its ``from_call``-th call while ``broken`` exists."""
    name = f"kdrl_test_flaky_{from_call}"
    (tmp_path / f"{name}.py").write_text(FLAKY_REWARD.format(from_call=from_call))
    (tmp_path / "broken").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # a fresh call count
    return f"reward.fn={name}:reward"


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_an_error_at_step_3_saves_step_2_and_resume_gives_the_uninterrupted_run(
    tiny_pair, prompts_file, tmp_path, monkeypatch, capsys, caplog
):
    # train.save_every_steps is 0 (the default): before this, nothing was kept.
    reward = flaky_reward(tmp_path, monkeypatch, from_call=15)
    out, clean = tmp_path / "run", tmp_path / "clean"
    args = base(tiny_pair, prompts_file, out, reward, "train.max_steps=4")
    assert main(["train", *args]) == 1
    assert "raised ZeroDivisionError: the reward's own bug" in last_error(capsys)
    assert f"its checkpoint is {checkpoint_path(out, 2)}" in caplog.text
    assert "--resume continues from it" in caplog.text
    assert find_latest_checkpoint(out) == checkpoint_path(out, 2)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    # The report says how far it got and why it ended.
    assert read_status(out)["state"] == "failed"
    assert ("- steps: 2 of 4 planned, failed: RewardError: reward function "
            in write_report(out).read_text())  # fmt: skip
    # The cause fixed, --resume finishes exactly as a run that never failed.
    (tmp_path / "broken").unlink()
    assert main(["train", *args, "--resume"]) == 0
    assert main(["train", *base(tiny_pair, prompts_file, clean, reward, "train.max_steps=4")]) == 0
    got, want = read_metrics(out), read_metrics(clean)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert read_status(out) == {"state": "finished", "step": 4, "planned": 4, "reason": ""}
    for a, b in zip(got, want, strict=True):
        for key in ("loss/total", "reward/mean", "rollout/reverse_kl", "optim/grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    wa = load_file(checkpoint_path(out, 4) / "model.safetensors")
    wb = load_file(checkpoint_path(clean, 4) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_an_error_in_the_first_step_leaves_a_folder_the_same_command_reuses(
    tiny_pair, prompts_file, tmp_path, monkeypatch, capsys, caplog
):
    reward = flaky_reward(tmp_path, monkeypatch, from_call=7)
    out = tmp_path / "run"
    args = base(tiny_pair, prompts_file, out, reward, "train.max_steps=2")
    assert main(["train", *args]) == 1
    assert "ZeroDivisionError" in last_error(capsys)
    assert "nothing to save; once the cause is fixed, run the same command again" in caplog.text
    assert find_latest_checkpoint(out) is None and not (out / "metrics.jsonl").exists()
    (tmp_path / "broken").unlink()
    assert main(["train", *args]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.slow
def test_killed_before_its_first_checkpoint_a_run_is_started_over_with_restart(
    tiny_pair, prompts_file, tmp_path, capsys
):
    out, hold = tmp_path / "run", tmp_path / "hold"
    args = base(tiny_pair, prompts_file, out, "reward.fn=signal_rewards:exact_match",
                "train.max_steps=4")  # fmt: skip
    hold.touch()  # step 3's first reward call waits: the run is killed there
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", signal_rewards.HOLD_ENV: str(hold),
        signal_rewards.HOLD_AT_ENV: "9",
        "PYTHONPATH": os.pathsep.join([str(Path(kdrl.__file__).parents[1]), str(TESTS),
                                       os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "kdrl", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not Path(f"{hold}.held").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no hold in step 3"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    hold.unlink()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert find_latest_checkpoint(out) is None
    # The same command, and --resume, each point at --restart.
    assert main(["train", *args]) == 2
    assert "holds a run with no complete checkpoint: pass --restart" in last_error(capsys)
    assert main(["train", *args, "--resume"]) == 2
    assert "no complete checkpoint" in (line := last_error(capsys)) and "--restart" in line
    assert main(["train", *args, "--restart"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    (previous,) = out.glob("previous-*")
    assert [r["step"] for r in read_metrics(previous)] == [1, 2]  # moved aside, not deleted
    assert (previous / "config.yaml").exists()


def test_overrides_may_come_before_between_and_after_options():
    args = parse(["train", "--config", "b.yaml", "train.max_steps=14", "--resume",
                  "train.threads=1", "optim.lr=0.1"])  # fmt: skip
    assert args.config == Path("b.yaml") and args.resume
    assert args.overrides == ["train.max_steps=14", "train.threads=1", "optim.lr=0.1"]
    args = parse(["config", "a.b=1", "--config", "c.yaml", "a.b=2"])
    assert args.overrides == ["a.b=1", "a.b=2"]  # in order: the last one wins
    with pytest.raises(SystemExit):
        parse(["train", "--config", "b.yaml", "--bogus", "x=1"])
    with pytest.raises(SystemExit):
        parse(["report", "run", "x=1"])  # report takes no overrides


def test_resume_and_train_with_overrides_after_an_option(tiny_pair, prompts_file, tmp_path):
    out = tmp_path / "run"
    first, *rest = base(tiny_pair, prompts_file, out, "train.max_steps=1")
    assert main(["train", first, "--restart", *rest]) == 0  # --restart on a new folder: fine
    assert main(["train", first, "--resume", *rest, "train.max_steps=2"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_contradictory_flags_are_refused(tiny_pair, prompts_file, tmp_path, capsys):
    args = base(tiny_pair, prompts_file, tmp_path / "run")
    assert main(["train", *args, "--force"]) == 2
    assert last_error(capsys) == (
        "kdrl: error: --force only applies with --resume (it accepts a changed config)"
    )
    assert main(["train", *args, "--resume", "--restart"]) == 2
    assert "pass one" in last_error(capsys)


def test_max_steps_beyond_the_epochs_is_warned_about_and_the_report_shows_the_steps_run(
    tiny_pair, prompts_file, tmp_path, caplog
):
    out = tmp_path / "run"
    # 24 prompts at 8 a step: one epoch (the default) is 3 steps, not 20.
    args = base(tiny_pair, prompts_file, out, "train.max_steps=20", "train.batch_size=8")
    assert main(["train", *args]) == 0
    assert ("train.max_steps=20, but train.epochs=1 over 24 prompts at train.batch_size=8 gives "
            "3 steps: the run stops there; raise train.epochs for more") in caplog.text  # fmt: skip
    assert "- steps: 3 of 3 planned, finished" in write_report(out).read_text()
