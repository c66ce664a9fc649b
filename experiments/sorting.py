"""A synthetic sorting task for the experiments: ``"83619402="`` -> ``"01234689"``.

Why sorting next to the adder of `kdrl.demo.synthetic`: every digit of a sum is fixed by the
operands alone, so an adder's answer tokens barely depend on each other and a wrong digit does
not change what should follow: there is little exposure bias to see. In sorting, each output
token depends on what was already written (the smallest digit not yet used), so one early
mistake changes every later step, which is the situation on-policy distillation is for.

The teacher is trained with *prefix noise*: a share of its training rows carry one wrong answer
token, followed by the right way to go on, so that the teacher's behaviour after a mistake is
defined ("recovery" states) rather than whatever an untrained state happens to give:

    after the prefix a_1..a_k (a_k possibly wrong), write the input digits not yet written,
    in ascending order; a written digit that was not (or no longer) in the input is ignored.

With ``undo=True`` the answer may also *take a mistake back*: the token ``<`` deletes the token
before it, and an answer counts once its deletions are applied. The prefix-noise teacher then
learns to write ``<`` right after a wrong token and go on correctly, so a student can recover
from its own mistakes and still be right, as a reasoning model can after a wrong step. Without
``undo`` a mistake is final, and exact match cannot tell a student that recovers from one that
does not.

The student is the teacher with some of its layers removed (`kdrl.prune`), as in the adder.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdrl.demo.synthetic import CHARS, SyntheticPaths, fit_adder
from kdrl.prune import prune_decoder_layers
from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm

MARKER = "prepared.json"
DIGITS = "0123456789"
UNDO = "<"


@dataclass(frozen=True)
class SortSettings:
    """Everything a prepared folder depends on; a cached folder with other settings is rebuilt."""

    seed: int
    length: int = 8
    n_train: int = 20000
    n_eval: int = 200
    noise: float = 0.2
    """Share of the teacher's training rows that carry one wrong answer token."""
    hidden: int = 48
    layers: int = 3
    keep: tuple[int, ...] = (0, 1)
    max_steps: int = 800
    undo: bool = False
    """Answers may take a mistake back with ``<`` (see the module docstring)."""
    version: int = 2


def rest_after(digits: str, written: str) -> str:
    """The right continuation after ``written``: the input digits not yet written, sorted."""
    left = list(digits)
    for c in written:
        if c in left:
            left.remove(c)
    return "".join(sorted(left))


def apply_undo(text: str) -> str:
    """``text`` with each ``<`` and the token before it removed."""
    kept: list[str] = []
    for c in text:
        if c == UNDO:
            if kept:
                kept.pop()
        else:
            kept.append(c)
    return "".join(kept)


@torch.no_grad()
def continuations(model, tokenizer, prefixes: list[str], n_new: int) -> list[str]:
    """Greedy continuation of each prefix, up to EOS or ``n_new`` tokens ("<no EOS>" when it
    does not stop: never correct). Prefixes of equal length are batched together."""
    was_training = model.training
    model.eval()
    out: dict[int, str] = {}
    by_length: dict[int, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        by_length.setdefault(len(prefix), []).append(i)
    eos = tokenizer.eos_token_id
    for rows in by_length.values():
        ids_NT = torch.tensor(
            tokenizer([prefixes[i] for i in rows], add_special_tokens=False)["input_ids"]
        )
        start = ids_NT.shape[1]
        for _ in range(n_new):
            next_N = model(input_ids=ids_NT).logits[:, -1].argmax(-1)
            ids_NT = torch.cat([ids_NT, next_N[:, None]], dim=1)
        for i, row in zip(rows, ids_NT[:, start:].tolist(), strict=True):
            out[i] = tokenizer.decode(row[: row.index(eos)]) if eos in row else "<no EOS>"
    model.train(was_training)
    return [out[i] for i in range(len(prefixes))]


def answer_accuracy(model, tokenizer, rows: list[dict[str, str]], *, undo: bool) -> float:
    """Share of ``rows`` whose greedy answer is right; with ``undo`` after applying its
    deletions, with room for two of them."""
    n_new = max(len(r["answer"]) for r in rows) + 1 + (4 if undo else 0)
    texts = continuations(model, tokenizer, [r["prompt"] for r in rows], n_new)
    if undo:
        texts = [apply_undo(t) for t in texts]
    return sum(t == r["answer"] for t, r in zip(texts, rows, strict=True)) / len(rows)


def sort_rows(n: int, *, length: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        digits = "".join(rng.choice(DIGITS) for _ in range(length))
        rows.append({"prompt": digits + "=", "answer": "".join(sorted(digits))})
    return rows


def with_mistake(
    row: dict[str, str], rng: random.Random, *, last: int, undo: bool
) -> tuple[str, str]:
    """``(prefix, truth)``: the prompt, the answer's first ``k`` tokens and one wrong token
    (``k`` uniform in ``[0, last)``), and the right continuation after it: with ``undo``, take
    the mistake back and write the rest of the sorted answer; without, write the input digits
    not yet written (`rest_after`)."""
    answer = row["answer"]
    k = rng.randrange(last)
    wrong = rng.choice([c for c in DIGITS if c != answer[k]])
    written = answer[:k] + wrong
    truth = UNDO + answer[k:] if undo else rest_after(row["prompt"][:-1], written)
    return row["prompt"] + written, truth


def forced_mistakes(eval_rows: list[dict[str, str]], *, undo: bool) -> list[tuple[str, str]]:
    """One early mistake per held-out row (among the first 4 answer tokens), the same for every
    arm and seed: row ``i`` draws from ``random.Random(i)``."""
    return [with_mistake(r, random.Random(i), last=4, undo=undo) for i, r in enumerate(eval_rows)]


def prepare_sorting(out_dir: Path, settings: SortSettings) -> SyntheticPaths:
    """Write ``train.jsonl``/``eval.jsonl`` (clean rows), a prefix-noise teacher trained until it
    sorts 99% of 256 clean training rows (or ``max_steps``), and a pruned ``student``; a folder
    prepared with the same settings is returned as it is."""
    marker = out_dir / MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["settings"] == json.loads(json.dumps(asdict(settings))):
            return _paths(out_dir, settings, saved["accuracy"])
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    rng = random.Random(settings.seed)
    rows = sort_rows(settings.n_eval + settings.n_train, length=settings.length, rng=rng)
    eval_rows, train_rows = rows[: settings.n_eval], rows[settings.n_eval :]
    noisy = [
        dict(zip(("prompt", "answer"), with_mistake(r, rng, last=settings.length - 1,
                                                     undo=settings.undo),
                 strict=True)) if rng.random() < settings.noise else r
        for r in train_rows[256:]
    ]  # fmt: skip
    tokenizer = char_tokenizer(CHARS + UNDO)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            teacher = tiny_causal_lm(tokenizer, hidden=settings.hidden, layers=settings.layers,
                                     heads=4, seed=settings.seed)  # fmt: skip
            # fit_adder is plain supervised training on prompt/answer rows, checked on the
            # first 256 rows: the clean ones.
            steps = fit_adder(teacher, tokenizer, train_rows[:256] + noisy,
                              max_steps=settings.max_steps, target=0.99, check_every=100,
                              seed=settings.seed)  # fmt: skip
        student = prune_decoder_layers(teacher, list(settings.keep))
        accuracy = {
            "teacher": answer_accuracy(teacher, tokenizer, eval_rows, undo=settings.undo),
            "student": answer_accuracy(student, tokenizer, eval_rows, undo=settings.undo),
        }
    finally:
        torch.set_num_threads(saved_threads)
    paths = _paths(out_dir, settings, accuracy)
    for folder, model in ((paths.teacher, teacher), (paths.student, student)):
        shutil.rmtree(folder, ignore_errors=True)
        save_tiny(folder, tokenizer, model)
    for path, part in ((paths.train_file, train_rows), (paths.eval_file, eval_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    info = {"settings": asdict(settings), "accuracy": accuracy, "teacher_steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    marker.with_suffix(".tmp").write_text(json.dumps(info, indent=1) + "\n")
    marker.with_suffix(".tmp").replace(marker)
    return paths


def _paths(out_dir: Path, s: SortSettings, accuracy: dict[str, float]) -> SyntheticPaths:
    return SyntheticPaths(
        student=out_dir / "student", teacher=out_dir / "teacher",
        train_file=out_dir / "train.jsonl", eval_file=out_dir / "eval.jsonl",
        digits=s.length - 1,  # synthetic_overrides allows digits + 2 = length + 1 new tokens
        teacher_accuracy=accuracy["teacher"], student_accuracy=accuracy["student"],
    )  # fmt: skip
