"""Preflight tokenizer/model guard (research notes A.4, T7) with tiny offline tokenizers.

`char_tokenizer` puts its three special tokens at ids 0-2 and then one id per character in the
order given, so ``chars`` decides exactly which id means which string.
"""

from __future__ import annotations

import re

import pytest
from torch import nn

from kdrl.preflight import MAX_LISTED, PreflightError, check_models, check_tokenizers, model_rows
from kdrl.tiny import DEFAULT_CHARS, char_tokenizer, tiny_causal_lm

NAMES = {"student_name": "tiny-student", "teacher_name": "tiny-teacher"}


def check(student, teacher, *, student_rows: int | None = None, teacher_rows: int | None = None):
    return check_tokenizers(
        student,
        teacher,
        student_rows=len(student) if student_rows is None else student_rows,
        teacher_rows=len(teacher) if teacher_rows is None else teacher_rows,
        **NAMES,
    )


def problems(err: pytest.ExceptionInfo[PreflightError]) -> list[str]:
    """The listed problems of a PreflightError, one per line after the header."""
    lines = str(err.value).splitlines()
    assert lines[0].startswith("student 'tiny-student' and teacher 'tiny-teacher' cannot"), lines
    assert all(line.startswith("  - ") for line in lines[1:]), str(err.value)
    return lines[1:]


# --- tokenizers --------------------------------------------------------------------------------


def test_same_tokenizer_passes_without_warnings() -> None:
    assert check(char_tokenizer(), char_tokenizer()) == []


def test_error_is_a_value_error() -> None:
    assert issubclass(PreflightError, ValueError)


def test_teacher_lacking_tokens_lists_them_with_their_strings() -> None:
    student, teacher = char_tokenizer(chars="abcxyz"), char_tokenizer(chars="abc")
    with pytest.raises(PreflightError) as err:
        check(student, teacher, teacher_rows=len(student))  # rows exist, tokens do not
    (problem,) = problems(err)
    assert "3 student token id(s) are not in the teacher tokenizer" in problem, problem
    assert "('tiny-teacher' has 6 tokens)" in problem, problem
    assert problem.endswith(": 6 'x', 7 'y', 8 'z'"), problem


def test_different_order_is_a_mismatch() -> None:
    with pytest.raises(PreflightError) as err:
        check(char_tokenizer(chars="abc"), char_tokenizer(chars="acb"))
    (problem,) = problems(err)
    assert problem.startswith("  - 2 token id(s) are different tokens"), problem
    assert problem.endswith("(id: student vs teacher): 4: 'b' vs 'c', 5: 'c' vs 'b'"), problem


def test_added_think_token_is_named_even_with_padded_teacher_rows() -> None:
    # Qwen3 student, Qwen2.5 teacher in miniature: the teacher's padded rows cover the new ids,
    # so only the tokenizer comparison can catch it.
    student, teacher = char_tokenizer(), char_tokenizer()
    student.add_tokens(["<think>", "</think>"], special_tokens=True)
    think = student.convert_tokens_to_ids("<think>")
    assert think == len(teacher)
    with pytest.raises(PreflightError) as err:
        check(student, teacher, teacher_rows=len(teacher) + 64)
    (problem,) = problems(err)
    assert f"{think} '<think>', {think + 1} '</think>'" in problem, problem


def test_listing_is_capped_with_a_count_of_the_rest() -> None:
    student = char_tokenizer()  # 3 special + len(DEFAULT_CHARS) characters
    with pytest.raises(PreflightError) as err:
        check(student, char_tokenizer(chars="a"), teacher_rows=len(student))
    (problem,) = problems(err)
    missing = len(DEFAULT_CHARS) - 1
    assert f"{missing} student token id(s)" in problem
    assert len(re.findall(r"\b\d+ '", problem)) == MAX_LISTED, problem
    assert problem.endswith(f", and {missing - MAX_LISTED} more"), problem


def test_every_problem_is_listed_at_once() -> None:
    student, teacher = char_tokenizer(chars="abcd"), char_tokenizer(chars="ba")
    with pytest.raises(PreflightError) as err:
        check(student, teacher, student_rows=len(student) - 1, teacher_rows=4)
    listed = problems(err)
    assert len(listed) == 4, str(err.value)
    missing, different, student_rows, teacher_rows = listed
    assert missing.endswith(": 5 'c', 6 'd'")
    assert different.endswith(": 3: 'a' vs 'b', 4: 'b' vs 'a'")
    assert "student 'tiny-student' has 6 embedding rows but its tokenizer has 7 tokens" in (
        student_rows
    )
    assert "ids 6..6 have no row" in student_rows
    assert "teacher 'tiny-teacher' has 4 embedding rows" in teacher_rows
    assert teacher_rows.endswith(": 4 'b', 5 'c', 6 'd'")


def test_student_rows_below_its_tokenizer_is_an_error() -> None:
    tok = char_tokenizer(chars="abc")
    with pytest.raises(PreflightError, match=r"has 5 embedding rows but its tokenizer has 6"):
        check(tok, char_tokenizer(chars="abc"), student_rows=5)


def test_teacher_rows_below_student_ids_is_an_error() -> None:
    tok = char_tokenizer(chars="abc")
    with pytest.raises(PreflightError) as err:
        check(tok, char_tokenizer(chars="abc"), teacher_rows=5)
    (problem,) = problems(err)
    assert problem.endswith("would index past the teacher's logits: 5 'c'"), problem


def test_padded_rows_are_fine_and_a_larger_teacher_is_a_warning() -> None:
    tok = char_tokenizer()
    assert check(tok, char_tokenizer(), student_rows=len(tok) + 3, teacher_rows=len(tok) + 3) == []
    warnings = check(tok, char_tokenizer(), student_rows=len(tok) + 3, teacher_rows=len(tok) + 64)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("teacher vocabulary is larger"), warnings
    assert f"teacher logit columns from {len(tok)} on are ignored" in warnings[0]


def test_teacher_with_extra_tokens_is_a_warning() -> None:
    teacher = char_tokenizer()
    teacher.add_tokens(["<tool_call>"], special_tokens=True)
    warnings = check(char_tokenizer(), teacher)
    assert len(warnings) == 1 and "teacher vocabulary is larger" in warnings[0], warnings


def test_pad_difference_is_a_warning() -> None:
    warnings = check(char_tokenizer(), char_tokenizer(pad_is_eos=True))
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("pad token differs"), warnings
    assert "'<|pad|>' vs '<|im_end|>'" in warnings[0]


def test_eos_difference_is_a_warning() -> None:
    teacher = char_tokenizer()
    teacher.eos_token = "<|im_start|>"
    warnings = check(char_tokenizer(), teacher)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("EOS differs"), warnings
    assert "'<|im_end|>' vs '<|im_start|>'" in warnings[0]


def test_template_difference_is_a_warning_naming_whose_rendering_is_scored() -> None:
    teacher = char_tokenizer()
    teacher.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    warnings = check(char_tokenizer(), teacher)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("chat templates differ"), warnings
    assert "the teacher scores the student's rendering" in warnings[0]


# --- models ------------------------------------------------------------------------------------


def test_check_models_accepts_a_padded_teacher() -> None:
    tok = char_tokenizer()
    student = tiny_causal_lm(tok, hidden=16, layers=1)
    teacher = tiny_causal_lm(tok, hidden=16, layers=1, vocab_rows=len(tok) + 5)
    assert model_rows(teacher) == len(tok) + 5
    warnings = check_models(student, teacher, tok, tok, **NAMES)
    assert len(warnings) == 1 and "teacher vocabulary is larger" in warnings[0], warnings


def test_check_models_rejects_a_teacher_with_too_few_rows() -> None:
    tok = char_tokenizer(chars="abcd")
    student = tiny_causal_lm(tok, hidden=16, layers=1)
    teacher = tiny_causal_lm(tok, hidden=16, layers=1, vocab_rows=len(tok) - 1)
    with pytest.raises(PreflightError, match=r"teacher 'tiny-teacher' has 6 embedding rows"):
        check_models(student, teacher, tok, tok, **NAMES)


def test_model_rows_is_limited_by_the_smaller_of_embedding_and_head() -> None:
    tok = char_tokenizer(chars="abcd")
    model = tiny_causal_lm(tok, hidden=16, layers=1, vocab_rows=10)
    assert model_rows(model) == 10
    model.lm_head = nn.Linear(16, 6, bias=False)  # logits would have only 6 columns
    assert model_rows(model) == 6
    with pytest.raises(PreflightError, match=r"these ids would index past .*: 6 'd'$"):
        check_models(tiny_causal_lm(tok, hidden=16, layers=1), model, tok, tok, **NAMES)
