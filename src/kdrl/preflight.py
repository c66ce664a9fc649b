"""Preflight: can this teacher score this student's token ids? Checked once, before step one.

On-policy distillation hands the teacher the student's own sampled ids, so the pair must agree
on what every id the student can emit means. Three ways this goes silently wrong:

- the teacher's tokenizer lacks an id the student has (a Qwen3 student with a Qwen2.5 teacher:
  `<think>` = 151667 exists only in Qwen3) and the teacher scores it with an untrained padded row;
- the same id is a different string to the two tokenizers (the teacher scores nonsense);
- the teacher's logits have fewer columns than the student's ids, so indexing goes past them.

Padding is not a problem: Qwen2.5-14B has 152064 rows for 151665 tokens, and the rollout and the
teacher both cut logits to the student's tokenizer size, so rows past it are never used.
Differences that bias the teacher without making its scores meaningless (EOS, pad, chat
template, a larger teacher vocabulary) come back as warnings. Background: research notes A.3
(#12-#14) and A.4 (T7).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_LISTED = 20
"""Ids listed per problem; the rest are counted."""


class PreflightError(ValueError):
    """The student/teacher pair cannot share token ids; the message lists every problem."""


def check_tokenizers(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    *,
    student_rows: int,
    teacher_rows: int,
    student_name: str,
    teacher_name: str,
) -> list[str]:
    """Warnings for a usable pair; raise `PreflightError` listing every problem otherwise.

    ``*_rows`` are the embedding rows (logit columns) of each model. Every id of the student
    tokenizer, added and special tokens included, is an id the student can emit.
    """
    n_student, n_teacher = len(student_tok), len(teacher_tok)
    student_strings = student_tok.convert_ids_to_tokens(list(range(n_student)))
    teacher_strings = teacher_tok.convert_ids_to_tokens(list(range(min(n_student, n_teacher))))
    problems = _vocab_problems(student_strings, teacher_strings, teacher_name, n_teacher)
    if student_rows < n_student:
        problems.append(
            f"student {student_name!r} has {student_rows} embedding rows but its tokenizer has "
            f"{n_student} tokens: ids {student_rows}..{n_student - 1} have no row (a broken "
            "model, or the wrong tokenizer)"
        )
    if teacher_rows < n_student:
        beyond = [_token(i, student_strings[i]) for i in range(teacher_rows, n_student)]
        problems.append(
            f"teacher {teacher_name!r} has {teacher_rows} embedding rows (logit columns) but "
            f"the student tokenizer has {n_student} tokens; these ids would index past the "
            f"teacher's logits: {_listing(beyond)}"
        )
    if problems:
        raise PreflightError(
            f"student {student_name!r} and teacher {teacher_name!r} cannot be paired: the "
            "teacher scores the student's token ids, so both must give every student id the "
            "same token.\n" + "\n".join(f"  - {problem}" for problem in problems)
        )
    rows = (student_rows, teacher_rows)
    return _warnings(student_tok, teacher_tok, rows, student_name, teacher_name)


def check_models(
    student_model: PreTrainedModel,
    teacher_model: PreTrainedModel,
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    *,
    student_name: str,
    teacher_name: str,
) -> list[str]:
    """`check_tokenizers` with each model's rows read from its embeddings."""
    return check_tokenizers(
        student_tok,
        teacher_tok,
        student_rows=model_rows(student_model),
        teacher_rows=model_rows(teacher_model),
        student_name=student_name,
        teacher_name=teacher_name,
    )


def model_rows(model: PreTrainedModel) -> int:
    """Ids the model can both read and score: its input rows, or fewer logit columns."""
    rows = model.get_input_embeddings().num_embeddings
    head = model.get_output_embeddings()
    # A sampled id is fed back through the input embedding and scored by the output head, so
    # an id is usable only when both have a row for it; logits have the head's row count.
    return rows if head is None else min(rows, head.weight.shape[0])


def _vocab_problems(
    student_strings: Sequence[str | None],
    teacher_strings: Sequence[str | None],
    teacher_name: str,
    n_teacher: int,
) -> list[str]:
    missing, different = [], []
    for i, ours in enumerate(student_strings):
        theirs = teacher_strings[i] if i < len(teacher_strings) else None
        if ours is None:  # a hole in the student's ids: no token, so never emitted
            continue
        if theirs is None:
            missing.append(_token(i, ours))
        elif theirs != ours:
            different.append(f"{i}: {ours!r} vs {theirs!r}")
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} student token id(s) are not in the teacher tokenizer "
            f"({teacher_name!r} has {n_teacher} tokens); the teacher would score them with "
            f"untrained rows: {_listing(missing)}"
        )
    if different:
        problems.append(
            f"{len(different)} token id(s) are different tokens to the two tokenizers "
            f"(id: student vs teacher): {_listing(different)}"
        )
    return problems


def _warnings(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    rows: tuple[int, int],
    student_name: str,
    teacher_name: str,
) -> list[str]:
    (student_rows, teacher_rows), n_student = rows, len(student_tok)
    pair = f"student {student_name!r}, teacher {teacher_name!r}"
    warnings = []
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        warnings.append(
            f"EOS differs ({pair}: {student_tok.eos_token!r} vs {teacher_tok.eos_token!r}): the "
            "student stops at its own EOS, which the teacher may score as unlikely to end a turn"
        )
    if student_tok.pad_token_id != teacher_tok.pad_token_id:
        warnings.append(
            f"pad token differs ({pair}: {student_tok.pad_token!r} vs {teacher_tok.pad_token!r})"
            ": sequences are padded with the student's pad id, so pad positions must stay masked"
        )
    if student_tok.chat_template != teacher_tok.chat_template:
        warnings.append(
            f"chat templates differ ({pair}): the teacher scores the student's rendering of "
            "each prompt, not its own template's, which biases its log-probs"
        )
    if len(teacher_tok) > n_student or teacher_rows > student_rows:
        warnings.append(
            f"teacher vocabulary is larger ({pair}: {len(teacher_tok)} tokens and "
            f"{teacher_rows} rows vs {n_student} tokens and {student_rows} rows): the student "
            f"never emits ids >= {n_student}, so teacher logit columns from {n_student} on are "
            "ignored"
        )
    return warnings


def _token(i: int, text: str | None) -> str:
    return f"{i} {text!r}"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return shown + (f", and {rest} more" if rest > 0 else "")
