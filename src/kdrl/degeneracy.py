"""Signs that answers have degenerated: they stop ending, loop, or draw on a handful of tokens.

A student can lower its per-token reverse KL by moving into a region the teacher also finds
likely once it is there (a string of digits, a repeated phrase) without learning anything. These
signals catch that from the answers' token ids alone, for the training samples (``rollout/``),
the held-out answers (``eval/``) and the teacher's greedy answers (``eval/teacher_``).

Shape legend: ``B`` sequences, ``T`` positions.

An answer is the list of its token ids as sampled, its final EOS included when it has one. The
repeat and distinct rates look at its content only (the final EOS dropped): the EOS says that the
answer ended, not what it said.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

REPEAT_N = 3
"""Length of the token n-grams `repeat_frac` compares. 3 rather than 4: answers are short (the
demo stops at 32 tokens, so an answer has at most 30 trigrams), and a loop of period ``p``
repeats an n-gram as soon as it is ``p + n`` tokens long, so a shorter n sees a loop sooner; a
short natural sentence, on the other hand, rarely says the same three tokens twice."""

SIGNALS = ("eos_frac", "repeat_frac", "distinct_frac")
"""The names of the per-answer signals, as `signal_sums` returns them (callers prefix them)."""


def ends_with_eos(ids: Sequence[int], eos_id: int) -> bool:
    """Whether the answer ended with EOS (within its token limit) rather than being cut."""
    return len(ids) > 0 and ids[-1] == eos_id


def content(ids: Sequence[int], eos_id: int) -> list[int]:
    """The answer's tokens without its final EOS."""
    return list(ids[:-1]) if ends_with_eos(ids, eos_id) else list(ids)


def repeat_frac(ids: Sequence[int], n: int = REPEAT_N) -> float:
    """Share of the answer's token n-grams (``len(ids) - n + 1`` of them, overlapping) that
    already occurred earlier in the same answer; 0 for an answer shorter than ``n`` (it has no
    n-gram to repeat). ``[7, 7, 7, 7, 7]`` gives 2/3, ``[1, 2, 3, 1, 2, 3]`` gives 1/4."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def distinct_frac(ids: Sequence[int]) -> float:
    """Distinct token ids over tokens; 1 for an empty answer (nothing in it repeats; its
    emptiness shows in the answer length)."""
    return len(set(ids)) / len(ids) if ids else 1.0


def signal_sums(answers: Sequence[Sequence[int]], eos_id: int) -> dict[str, float]:
    """Each of `SIGNALS` summed over ``answers`` (ids with their final EOS, if any): divided by
    ``len(answers)`` they are the means. Sums, so that data-parallel ranks can add them."""
    texts = [content(ids, eos_id) for ids in answers]
    return {
        "eos_frac": float(sum(ends_with_eos(ids, eos_id) for ids in answers)),
        "repeat_frac": sum(repeat_frac(ids) for ids in texts),
        "distinct_frac": sum(distinct_frac(ids) for ids in texts),
    }


def signal_means(answers: Sequence[Sequence[int]], eos_id: int) -> dict[str, float]:
    """`signal_sums` averaged over the answers (empty when there are none)."""
    if not answers:
        return {}
    return {k: v / len(answers) for k, v in signal_sums(answers, eos_id).items()}


def response_ids(input_ids_BT: Tensor, response_mask_BT: Tensor) -> list[list[int]]:
    """The answer of each row of a batch (its ids where the response mask is true)."""
    return [row[mask].tolist() for row, mask in zip(input_ids_BT, response_mask_BT, strict=True)]
