"""Atomic, verifiable checkpoints of the student and the training state.

Layout of one run directory::

    OUTPUT_DIR/checkpoints/step-00000010/
        config.json, model.safetensors, generation_config.json, tokenizer files
        trainer_state.pt    optimizer / scheduler / RNG / sampler state, from the caller
        manifest.json       written last: step, size and sha256 of every other file

A checkpoint is built in ``checkpoints/.tmp-step-XXXXXXXX-<random>/``, every file is fsynced,
the manifest is written last, and only then is the folder renamed into place. A folder without
a manifest, or whose files do not match it, is never loaded; a crash at any point therefore
leaves either the previous checkpoints or the new one, never a half-written folder that looks
complete. Old checkpoints are pruned only after the new one is committed (verl #4873).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrl import __version__

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20
# Leaves and containers that `torch.load(weights_only=True)` reads back without extra allowlists.
_SAFE_LEAVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_SAFE_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SAFE_CONTAINERS = (dict, OrderedDict, list, tuple)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a folder on disk is not a complete checkpoint."""


def checkpoint_path(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: ``output_dir/checkpoints/step-%08d``."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    trainer_state: dict,
    keep: int,
    state_dict: dict | None = None,
) -> Path:
    """Atomically write the checkpoint of `step` and prune all but the `keep` newest.

    `model` and `tokenizer` are Hugging Face objects saved with `save_pretrained`, so the folder
    loads with `AutoModelForCausalLM.from_pretrained`; `state_dict` (e.g. gathered from an FSDP
    wrapper) replaces the model's own. `trainer_state` is saved with `torch.save` and must hold
    only tensors, numbers, strings, None and dict/list/tuple of them, so that it loads back with
    `weights_only=True`. Returns the committed folder. Raises `CheckpointError` naming the
    directory when the disk refuses the write; the previous checkpoints are then untouched.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep} (train.keep_checkpoints)")
    _check_weights_only_safe(trainer_state, "trainer_state")
    final = checkpoint_path(output_dir, step)
    root = final.parent
    tmp = root / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise CheckpointError(f"cannot create checkpoint folder {tmp}: {err}") from err
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        _write_manifest(tmp, step)
        _commit(tmp, final)
    except BaseException as err:
        # Also on KeyboardInterrupt: a half-written folder must not survive the failed save.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(
                f"saving checkpoint step {step} into {root} failed: {err}; "
                "the previous checkpoints are untouched"
            ) from err
        raise
    _prune(root, keep=keep, newest=final)
    return final


def find_latest_checkpoint(output_dir: Path, *, verify_hashes: bool = True) -> Path | None:
    """The highest-step valid checkpoint under ``output_dir/checkpoints``, or None.

    Temporary folders never count; invalid `step-*` folders are skipped with a warning.
    """
    for path in _step_dirs(Path(output_dir) / CHECKPOINTS):
        try:
            verify_checkpoint(path, hashes=verify_hashes)
        except CheckpointError as err:
            logger.warning("skipping invalid checkpoint %s: %s", path, err)
            continue
        return path
    return None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> None:
    """Raise `CheckpointError` unless every file in `path`'s manifest exists with its recorded
    size (and sha256 when `hashes`), and the manifest's step matches the folder name."""
    path = Path(path)
    manifest = _read_manifest(path)
    match = _STEP_DIR.fullmatch(path.name)
    if match is None or int(match.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"checkpoint {path}: folder name does not match manifest step {manifest['step']}"
        )
    files = manifest["files"]
    required = ("config.json", TRAINER_STATE)
    missing = [name for name in required if name not in files]
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("*.safetensors")
    if missing:
        raise CheckpointError(f"checkpoint {path}: manifest lists no {', '.join(missing)}")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} has {size} bytes, manifest says {entry['size']}"
            )
        if hashes and _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its sha256")


def load_trainer_state(
    path: Path, *, verify: bool = True, map_location: str | torch.device = "cpu"
) -> dict:
    """Load ``trainer_state.pt`` of a checkpoint, after verifying the folder unless told not to
    (e.g. right after `find_latest_checkpoint` already hashed it)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    return torch.load(path / TRAINER_STATE, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict:
    """The global RNG states of python `random`, numpy, torch CPU and (if present) CUDA.

    numpy's key is kept as a tensor so the dict loads back with `weights_only=True`.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Restore what `capture_rng_state` returned, so the next draws repeat exactly."""
    missing = {"python", "numpy", "torch", "cuda"} - set(state)
    if missing:
        raise ValueError(f"restore_rng_state: RNG state lacks {sorted(missing)}")
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is None:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
        # Resuming on other hardware must still work; it just cannot repeat the same draws.
        logger.warning(
            "CUDA RNG state of %d device(s) not restored: %d visible here",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )
        return
    torch.cuda.set_rng_state_all(cuda)


def _check_weights_only_safe(obj: object, where: str) -> None:
    """Fail at the first save, not at resume hours later, on state `weights_only` cannot load."""
    if type(obj) in _SAFE_TENSORS or type(obj) in _SAFE_LEAVES:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_weights_only_safe(key, f"{where} key {key!r}")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{i}]")
        return
    raise ValueError(
        f"save_checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot read back; convert it to a tensor, number, "
        "string or a dict/list/tuple of them"
    )


def _write_manifest(folder: Path, step: int) -> None:
    """Hash and fsync every payload file, then write and fsync the manifest (the commit mark)."""
    files: dict[str, dict[str, int | str]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[file.relative_to(folder).as_posix()] = {
            "size": file.stat().st_size,
            "sha256": _sha256(file, fsync=True),
        }
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        _fsync_dir(sub)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "kdrl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(folder)


def _commit(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(root)
        return
    # os.rename cannot replace a non-empty directory. The aside name starts with .tmp- so that
    # a crash in this window leaves nothing that `find_latest_checkpoint` could mistake.
    aside = root / f"{_TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(aside, final)
        raise
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, *, keep: int, newest: Path) -> None:
    """Keep `newest` and the `keep - 1` next valid checkpoints; delete other step and tmp dirs."""
    kept = [newest]
    doomed = []
    for path in _step_dirs(root):
        if path == newest:
            continue
        if len(kept) < keep and _is_valid(path):
            kept.append(path)
        else:
            doomed.append(path)
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_TMP_PREFIX)]
    for path in doomed:
        _remove_dir(path)


def _remove_dir(path: Path) -> None:
    """Rename to a tmp name first, so a crash mid-delete never leaves a partial `step-*`."""
    target = path
    try:
        if not path.name.startswith(_TMP_PREFIX):
            target = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}")
            os.rename(path, target)
        shutil.rmtree(target)
    except OSError as err:
        # The new checkpoint is already committed; a stuck old one costs disk, not correctness.
        logger.warning("could not delete old checkpoint folder %s: %s", target, err)


def _is_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path, hashes=False)
    except CheckpointError as err:
        logger.warning("deleting invalid checkpoint %s: %s", path, err)
        return False
    return True


def _step_dirs(root: Path) -> list[Path]:
    """`step-*` folders under `root`, highest step first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST} (incomplete save)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST}: {err}") from err
    ok = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("files"), dict)
        and all(
            isinstance(e, dict)
            and isinstance(e.get("size"), int)
            and isinstance(e.get("sha256"), str)
            for e in manifest["files"].values()
        )
    )
    if not ok:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lacks step or per-file size/sha256")
    return manifest


def _sha256(file: Path, *, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Persist the directory's entries (new names, renames) themselves."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (e.g. certain network mounts) cannot fsync a directory.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
