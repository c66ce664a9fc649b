"""Degeneracy signals on hand-written token lists: exact values."""

from __future__ import annotations

import pytest
import torch

from kdrl.degeneracy import (
    REPEAT_N,
    content,
    distinct_frac,
    ends_with_eos,
    repeat_frac,
    response_ids,
    signal_means,
    signal_sums,
)

EOS = 2


def test_ends_with_eos_and_content():
    assert ends_with_eos([5, 6, EOS], EOS) and content([5, 6, EOS], EOS) == [5, 6]
    assert not ends_with_eos([5, EOS, 6], EOS) and content([5, EOS, 6], EOS) == [5, EOS, 6]
    assert not ends_with_eos([], EOS) and content([], EOS) == []
    assert ends_with_eos([EOS], EOS) and content([EOS], EOS) == []


def test_repeat_frac_counts_trigrams_seen_earlier():
    assert REPEAT_N == 3
    assert repeat_frac([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)  # 777 x3: the last two repeat
    assert repeat_frac([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # 123 231 312 123
    assert repeat_frac([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeat_frac([1, 2, 1, 2, 1, 2, 1, 2]) == pytest.approx(4 / 6)  # 121 212, then 4 repeats
    # Same tokens, not the same trigram: 1 2 3 / 3 2 1 share no trigram.
    assert repeat_frac([1, 2, 3, 2, 1]) == 0.0
    assert repeat_frac([1, 2]) == 0.0 and repeat_frac([]) == 0.0  # no trigram at all
    assert repeat_frac([1, 2, 1, 2], n=2) == pytest.approx(1 / 3)  # 12 21 12


def test_distinct_frac():
    assert distinct_frac([4, 4, 4, 4]) == 0.25
    assert distinct_frac([1, 2, 3, 1]) == 0.75
    assert distinct_frac([9]) == 1.0 and distinct_frac([]) == 1.0


def test_signal_sums_and_means_drop_the_final_eos():
    answers = [
        [5, 6, 7, EOS],  # ended; content 5 6 7: no repeat, all distinct
        [8, 8, 8, 8, 8, 8],  # cut: 4 trigrams, 3 repeat; 1 distinct of 6
        [EOS],  # ended at once: empty content
    ]
    sums = signal_sums(answers, EOS)
    assert sums == pytest.approx({"eos_frac": 2.0, "repeat_frac": 0.75,
                                  "distinct_frac": 1 + 1 / 6 + 1})  # fmt: skip
    means = signal_means(answers, EOS)
    assert means == pytest.approx({k: v / 3 for k, v in sums.items()})
    # The EOS is not content: 1 distinct of 2 tokens, not 2 of 3.
    assert signal_sums([[4, 4, EOS]], EOS)["distinct_frac"] == 0.5
    assert signal_means([], EOS) == {}


def test_response_ids_reads_the_masked_positions():
    ids = torch.tensor([[10, 11, 5, 6, EOS, 0], [10, 7, 7, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert response_ids(ids, mask) == [[5, 6, EOS], [7, 7, 7]]
