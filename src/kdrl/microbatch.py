"""Token-budget micro-batches: group sequences so each forward pass stays under a token budget.

The budget counts the padded rectangle (rows x longest row), which is what a forward pass
costs. Sequences are never split; one longer than the budget gets a micro-batch of its own.
"""

from __future__ import annotations


def token_budget_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped into micro-batches, longest rows first (so each group's first row
    sets its width). Deterministic; every row appears exactly once."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_mb must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
