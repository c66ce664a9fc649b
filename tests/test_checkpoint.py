"""Checkpoints: plain-HF loadability, manifest verification, pruning, RNG round trip, failed
saves, and SIGKILL in the middle of real saves (zygote subprocess forking savers)."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import shutil
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from kdrl.tiny import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_causal_lm(tok, hidden=16, layers=1, seed=3)


def trained_state(model: torch.nn.Module, step: int) -> dict:
    """A realistic trainer_state: AdamW and LambdaLR after one real update, RNG, sampler."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    sched.step()
    return {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "sampler": {"epoch": 0, "index": 7, "order": torch.randperm(5)},
    }


def save(out: Path, step: int, model, tok, keep: int = 3, **state) -> Path:
    state = state or {"step": step}
    return save_checkpoint(out, step, model=model, tokenizer=tok, trainer_state=state, keep=keep)


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_checkpoint_loads_with_plain_hf_and_round_trips_state(tmp_path, model, tok):
    state = trained_state(model, step=10)
    path = save_checkpoint(tmp_path, 10, model=model, tokenizer=tok, trainer_state=state, keep=2)
    assert path == checkpoint_path(tmp_path, 10) == tmp_path / "checkpoints" / "step-00000010"
    assert names(tmp_path) == ["step-00000010"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 10
    for name in ("config.json", "model.safetensors", "generation_config.json", "trainer_state.pt"):
        assert manifest["files"][name]["size"] == (path / name).stat().st_size

    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded_tok = AutoTokenizer.from_pretrained(path)
    ids = loaded_tok("Hello, KD!", return_tensors="pt").input_ids
    assert ids.tolist() == tok("Hello, KD!", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    back = load_trainer_state(path)
    assert back["step"] == 10 and back["sampler"]["index"] == 7
    assert torch.equal(back["sampler"]["order"], state["sampler"]["order"])
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert (
        fresh.state_dict()["param_groups"][0]["lr"] == state["optimizer"]["param_groups"][0]["lr"]
    )


def test_explicit_state_dict_is_what_gets_saved(tmp_path, model, tok):
    # The FSDP path: the caller gathers a full state dict and passes it in.
    sd = {k: torch.zeros_like(v) if "lm_head" in k else v for k, v in model.state_dict().items()}
    path = save_checkpoint(
        tmp_path, 1, model=model, tokenizer=tok, trainer_state={}, keep=1, state_dict=sd
    )
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.count_nonzero(loaded.lm_head.weight) == 0
    assert torch.count_nonzero(model.lm_head.weight) > 0


def test_prune_keeps_exactly_keep_and_clears_stale_tmp(tmp_path, model, tok):
    stale = tmp_path / "checkpoints" / ".tmp-step-00000001-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    for step in range(1, 6):
        save(tmp_path, step, model, tok, keep=2)
    assert names(tmp_path) == ["step-00000004", "step-00000005"]
    save(tmp_path, 6, model, tok, keep=1)
    assert names(tmp_path) == ["step-00000006"]


def test_prune_drops_invalid_and_never_the_new_one(tmp_path, model, tok):
    save(tmp_path, 1, model, tok)
    save(tmp_path, 2, model, tok)
    (checkpoint_path(tmp_path, 2) / "manifest.json").unlink()
    # A higher step from an abandoned trajectory must not push the new checkpoint out.
    shutil.copytree(checkpoint_path(tmp_path, 1), tmp_path / "checkpoints" / "step-00000009")
    (tmp_path / "checkpoints" / "step-00000009" / "manifest.json").write_text(
        (checkpoint_path(tmp_path, 1) / "manifest.json")
        .read_text()
        .replace('"step": 1', '"step": 9')
    )
    save(tmp_path, 3, model, tok, keep=2)
    assert names(tmp_path) == ["step-00000003", "step-00000009"]


def test_resave_same_step_replaces_it(tmp_path, model, tok):
    save(tmp_path, 3, model, tok, value=1)
    save(tmp_path, 3, model, tok, value=2)
    assert names(tmp_path) == ["step-00000003"]
    assert load_trainer_state(checkpoint_path(tmp_path, 3))["value"] == 2


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-1])


CORRUPTIONS = {
    "flip-byte": ("model.safetensors", _flip_byte, "sha256"),
    "truncated": ("trainer_state.pt", _truncate, "bytes"),
    "deleted": ("config.json", Path.unlink, "missing"),
    "no-manifest": ("manifest.json", Path.unlink, "no manifest.json"),
    "bad-manifest": ("manifest.json", lambda f: f.write_text("{"), "unreadable"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_checkpoint_is_invalid_and_previous_is_found(tmp_path, model, tok, kind, caplog):
    save(tmp_path, 1, model, tok)
    bad = save(tmp_path, 2, model, tok)
    name, corrupt, message = CORRUPTIONS[kind]
    corrupt(bad / name)
    with pytest.raises(CheckpointError, match=message) as info:
        verify_checkpoint(bad)
    assert str(bad) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="kdrl.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    assert str(bad) in caplog.text
    with pytest.raises(CheckpointError):
        load_trainer_state(bad)


def test_flipped_byte_passes_size_check_only(tmp_path, model, tok):
    bad = save(tmp_path, 2, model, tok)
    _flip_byte(bad / "model.safetensors")
    verify_checkpoint(bad, hashes=False)
    assert find_latest_checkpoint(tmp_path, verify_hashes=False) == bad
    assert find_latest_checkpoint(tmp_path) is None


def test_tmp_and_misnamed_folders_never_count(tmp_path, model, tok):
    assert find_latest_checkpoint(tmp_path) is None
    good = save(tmp_path, 1, model, tok)
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / ".tmp-step-00000005-abcd")  # complete, but never committed
    shutil.copytree(good, root / "step-00000004")  # manifest says step 1
    assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="does not match manifest step 1"):
        verify_checkpoint(root / "step-00000004")


def test_rng_round_trip_through_a_checkpoint(tmp_path, model, tok):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    path = save(tmp_path, 1, model, tok, rng=capture_rng_state())

    def draws() -> tuple:
        return random.random(), np.random.normal(size=3).tolist(), torch.rand(4).tolist()

    first = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draws() != first
    restore_rng_state(load_trainer_state(path)["rng"])
    assert draws() == first


def test_restore_rng_rejects_incomplete_state():
    with pytest.raises(ValueError, match="lacks"):
        restore_rng_state({"python": random.getstate()})


def test_state_that_weights_only_cannot_load_is_rejected_before_writing(tmp_path, model, tok):
    with pytest.raises(ValueError, match=r"trainer_state\['sampler'\]\['order'\].*numpy"):
        save(tmp_path, 1, model, tok, sampler={"order": np.arange(3)})
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("bad", [{"step": -1}, {"keep": 0}])
def test_bad_arguments(tmp_path, model, tok, bad):
    args = {"step": 1, "keep": 1} | bad
    with pytest.raises(ValueError, match=r"step must|keep must"):
        save_checkpoint(
            tmp_path, args["step"], model=model, tokenizer=tok, trainer_state={}, keep=args["keep"]
        )


def test_unwritable_checkpoints_dir_raises_checkpoint_error(tmp_path, model, tok):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints")):
        save(tmp_path, 1, model, tok)


def _save_under_read_only_mount(out: Path, step: int, model, tok, result: Path) -> None:
    """Runs in a forked child (single-threaded, so it may leave the mount namespace): bind-mount
    ``out/checkpoints`` read-only in a private mount namespace, where root cannot write either,
    try to save, and report the outcome in ``result``. Never returns."""
    clone_newns, ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = (
        0x20000, 1, 32, 4096, 16384, 1 << 18,
    )  # fmt: skip
    code = 3
    try:
        torch.set_num_threads(1)  # no OpenMP pool is usable after fork
        libc = ctypes.CDLL(None, use_errno=True)
        folder = str(out / "checkpoints").encode()
        for call in (
            lambda: libc.unshare(clone_newns),
            # Private, so the read-only mount never shows in the test's own namespace.
            lambda: libc.mount(b"none", b"/", None, ms_rec | ms_private, None),
            lambda: libc.mount(folder, folder, None, ms_bind, None),
            lambda: libc.mount(b"none", folder, None, ms_bind | ms_remount | ms_rdonly, None),
        ):
            if call() != 0:
                result.write_text(f"no read-only mount here: {os.strerror(ctypes.get_errno())}")
                os._exit(4)
        try:
            save(out, step, model, tok)
            result.write_text("saved into a read-only folder")
        except CheckpointError as err:
            result.write_text(f"CheckpointError: {err}")
            code = 0
    except BaseException:
        result.write_text(traceback.format_exc())
    finally:
        os._exit(code)


def test_read_only_checkpoints_dir_raises_checkpoint_error(tmp_path, model, tok):
    good = save(tmp_path, 1, model, tok)
    folder = tmp_path / "checkpoints"
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            with pytest.raises(CheckpointError, match=str(folder)):
                save(tmp_path, 2, model, tok)
        finally:
            folder.chmod(0o700)
    else:
        # Root ignores permission bits (CI runs as root), not a read-only mount.
        if not hasattr(os, "fork"):
            pytest.skip("as root this test needs os.fork and Linux mount namespaces")
        result = tmp_path / "child-result.txt"
        pid = os.fork()
        if pid == 0:
            _save_under_read_only_mount(tmp_path, 2, model, tok, result)
        status = os.waitpid(pid, 0)[1]
        text = result.read_text() if result.exists() else "(no result)"
        if os.WEXITSTATUS(status) == 4:
            pytest.skip(f"running as root and {text}: cannot make a folder root cannot write")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
        assert text.startswith("CheckpointError") and str(folder) in text, text
    assert find_latest_checkpoint(tmp_path) == good
    assert names(tmp_path) == ["step-00000001"]


def test_disk_full_mid_save_keeps_previous_checkpoint(tmp_path, model, tok, monkeypatch):
    good = save(tmp_path, 1, model, tok)
    real_save = model.save_pretrained

    def save_then_disk_full(folder, **kwargs):
        real_save(folder, **kwargs)  # the weights land, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    # A real full disk cannot be made here; this is the one stand-in.
    monkeypatch.setattr(model, "save_pretrained", save_then_disk_full)
    with pytest.raises(CheckpointError, match="No space left") as info:
        save(tmp_path, 2, model, tok)
    assert str(tmp_path / "checkpoints") in str(info.value)
    assert names(tmp_path) == ["step-00000001"]  # temp folder removed, old one untouched
    assert find_latest_checkpoint(tmp_path) == good


def _saver_child(out: Path, step: int, model, tok, error_file: Path) -> None:
    """Runs in a forked child: save checkpoints in a loop until killed; never returns."""
    try:
        # As DataLoader workers do: no OpenMP pool is usable after fork.
        torch.set_num_threads(1)
        while True:
            state = {"step": step, "blob": torch.randn(1 << 18)}
            save_checkpoint(out, step, model=model, tokenizer=tok, trainer_state=state, keep=2)
            step += 1
    except BaseException:
        error_file.write_text(traceback.format_exc())
    finally:
        os._exit(3)


def _wait_for(path: Path, pid: int, error_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, f"saver exited ({status}):\n{error_file.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint {path} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_mid_save_never_leaves_a_partial_checkpoint(tmp_path, tok):
    # Forked from this process rather than spawned: a fresh interpreter spends ~6 s importing
    # torch and transformers, a fork starts saving at once. Each child is a real process.
    model = tiny_causal_lm(tok, hidden=256, layers=4)  # ~11 MB: one save takes ~0.1 s
    out, error_file = tmp_path / "run", tmp_path / "child-error.txt"
    rng = random.Random(0)
    seen_tmp: set[str] = set()
    mid_save_kills = found = 0
    for round_ in range(8):
        latest = find_latest_checkpoint(out)
        step = int(latest.name[5:]) if latest else 1
        # Odd rounds re-save the latest step, exercising the replace path under a kill.
        step += round_ % 2 == 0
        pid = os.fork()
        if pid == 0:
            _saver_child(out, step, model, tok, error_file)
        if round_ % 2 == 0:
            # Let the first save commit, however slow this machine is right now, so that
            # every later round must find a checkpoint; odd rounds kill without waiting.
            _wait_for(checkpoint_path(out, step), pid, error_file)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status), f"saver died on its own:\n{error_file.read_text()}"
        tmp_now = {p.name for p in (out / "checkpoints").glob(".tmp-step-*")}
        mid_save_kills += bool(tmp_now - seen_tmp)
        seen_tmp |= tmp_now

        # Every committed step-* folder is complete at all times, and the latest one loads.
        for path in (out / "checkpoints").glob("step-*"):
            verify_checkpoint(path)
        latest = find_latest_checkpoint(out)
        if latest is not None:
            found += 1
            AutoModelForCausalLM.from_pretrained(latest)
            assert load_trainer_state(latest, verify=False)["step"] == int(latest.name[5:])
    assert found == 8 and mid_save_kills >= 2, (found, mid_save_kills)
