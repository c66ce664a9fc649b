"""The order in which training prompts are visited: deterministic epochs of shuffled batches,
with a position that a checkpoint saves and restores exactly."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kdrl.config.validate import ConfigError

_SAMPLER_POSITION = ("epoch", "position", "steps_done")
# A saved position means nothing for another prompt set, batch size, seed or shuffle setting.
_SAMPLER_IDENTITY = ("n_prompts", "batch_size", "seed", "shuffle")


class PromptSampler:
    """Which prompts each training step uses: a fixed, resumable sequence of global batches.

    An epoch is a permutation of the prompt indices (identity when ``shuffle`` is false) cut into
    ``n_prompts // batch_size`` full batches; the remainder is dropped so every step has the same
    size. The permutation depends only on ``(seed, epoch)``, never on global RNG state. The
    sampler is rank-agnostic: it yields the global batch, and data-parallel ranks slice it.
    """

    def __init__(
        self,
        n_prompts: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        epochs: int,
        max_steps: int,
    ) -> None:
        if batch_size < 1 or batch_size > n_prompts:
            raise ConfigError(
                f"train.batch_size must be in [1, {n_prompts}] (the number of prompts), "
                f"got {batch_size}"
            )
        self.n_prompts = n_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.max_steps = max_steps
        self.steps_per_epoch = n_prompts // batch_size
        self.epoch = 0
        self.position = 0  # batches drawn from the current epoch
        self.steps_done = 0

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps > 0 else total

    def next_batch(self) -> list[int] | None:
        """The next batch of prompt indices, or None once `total_steps` batches were drawn."""
        if self.steps_done >= self.total_steps:
            return None
        if self.position == self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        # Recomputed each step (one randperm, cheap next to a training step): no cached order
        # that a restored state could disagree with.
        start = self.position * self.batch_size
        batch = self._epoch_order(self.epoch)[start : start + self.batch_size]
        self.position += 1
        self.steps_done += 1
        return batch

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_prompts))
        # A hash, not seed + epoch, so that (seed 1, epoch 0) and (seed 0, epoch 1) differ.
        digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randperm(self.n_prompts, generator=generator).tolist()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position, with what it is only valid for."""
        return {key: getattr(self, key) for key in (*_SAMPLER_POSITION, *_SAMPLER_IDENTITY)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the sampler that saved ``state`` stopped."""
        for key in _SAMPLER_IDENTITY:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the prompt order: it was saved with {key}={state[key]!r}, "
                    f"this run has {key}={getattr(self, key)!r}"
                )
        for key in _SAMPLER_POSITION:
            setattr(self, key, int(state[key]))
