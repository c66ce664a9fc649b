"""On-policy sampling: the student answers each prompt ``n_samples`` times.

Shape legend: ``B`` sequences (prompts x samples), ``T`` positions of prompt + response,
``V`` vocabulary. A :class:`RolloutBatch` lays each sequence out right-padded,
``[prompt | response | pad]``, and every ``*_BT`` tensor is aligned with ``input_ids_BT``:
position ``t`` holds a value about token ``t`` (e.g. ``log q(x_t | x_<t)``).

The :class:`Rollout` protocol is the seam a faster engine (vLLM) plugs into; the loop only sees
``generate(prompts) -> RolloutBatch`` and ``sync_weights(model)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from kdrl import stop
from kdrl.data import Prompt


@dataclass
class RolloutBatch:
    """Sampled sequences with everything the loss needs about them."""

    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    response_mask_BT: Tensor
    """True on response tokens (the EOS that ends a response included)."""
    behav_logprobs_BT: Tensor
    """Log-prob of each response token under the distribution it was sampled from; 0 elsewhere."""
    prompt_index_B: list[int]
    """Row of the prompt set each sequence answers (``n_samples`` consecutive rows share one)."""
    truncated_B: Tensor
    """True where the response hit ``max_new_tokens`` without EOS."""
    response_texts: list[str] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def response_len_B(self) -> Tensor:
        return self.response_mask_BT.sum(1)

    def select(self, rows: list[int]) -> RolloutBatch:
        """Sub-batch of the given rows, trimmed to its longest sequence."""
        idx = torch.tensor(rows, dtype=torch.long)
        width = int(self.attention_mask_BT[idx].sum(1).max())
        return RolloutBatch(
            input_ids_BT=self.input_ids_BT[idx, :width],
            attention_mask_BT=self.attention_mask_BT[idx, :width],
            response_mask_BT=self.response_mask_BT[idx, :width],
            behav_logprobs_BT=self.behav_logprobs_BT[idx, :width],
            prompt_index_B=[self.prompt_index_B[i] for i in rows],
            truncated_B=self.truncated_B[idx],
            response_texts=[self.response_texts[i] for i in rows] if self.response_texts else [],
        )


def sequence_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed of one sampled sequence: a function of the run's step seed, the prompt's row in
    the data and the sample number only. Samples therefore do not depend on which other prompts
    share the batch, so N data-parallel ranks draw exactly what one process would."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Rollout(Protocol):
    def generate(
        self, prompts: list[Prompt], *, n_samples: int, seed: int | None = None
    ) -> RolloutBatch:
        """``n_samples`` answers per prompt. With ``seed``, sequence ``j`` of prompt ``p`` is
        drawn from its own generator seeded by ``sequence_seed(seed, p.index, j)``; without,
        from the global RNG."""
        ...

    def sync_weights(self, model: PreTrainedModel) -> None: ...

    def close(self) -> None:
        """Release the engine (called once, after the last step, before process-group
        teardown)."""
        ...


class _SampleAndRecord(LogitsProcessor):
    """The whole sampling distribution in one place, recording what was sampled from it.

    ``generate`` runs with its own warpers off; this processor applies the temperature, masks
    ids past the tokenizer (padded embedding rows) and applies top-p. Each call also receives the
    token sampled from the previous call's distribution, so it records that token's log-prob
    and keeps only one ``[B, V]`` distribution alive.
    """

    def __init__(
        self,
        *,
        temperature: float,
        top_p: float,
        vocab: int,
        generators: list[torch.Generator] | None = None,
    ) -> None:
        self.temperature, self.top_p, self.vocab = temperature, top_p, vocab
        self.generators = generators
        self.prev_logp_BV: Tensor | None = None
        self.recorded: list[Tensor] = []

    def record(self, tokens_B: Tensor) -> None:
        if self.prev_logp_BV is not None:
            self.recorded.append(self.prev_logp_BV.gather(1, tokens_B[:, None]).squeeze(1))
            self.prev_logp_BV = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.record(input_ids[:, -1])
        scores = scores.float()
        if self.temperature > 0:
            scores = scores / self.temperature
        scores[:, self.vocab :] = -torch.inf
        if 0 < self.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            mass_before = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1)
            drop = torch.zeros_like(scores, dtype=torch.bool)
            drop.scatter_(1, order, mass_before >= self.top_p)
            scores = scores.masked_fill(drop, -torch.inf)
        self.prev_logp_BV = scores.log_softmax(-1)
        if self.generators is None:
            return scores
        # Each row draws from its own generator, by inverting its CDF at one uniform number
        # (``multinomial`` would draw one exponential per vocabulary entry: ~9 ms a step at
        # 49k ids); generate() then takes the argmax of a one-hot distribution.
        picked_B = inverse_cdf_sample(self.prev_logp_BV.exp(), self.generators)
        onehot = torch.full_like(scores, -torch.inf)
        onehot.scatter_(1, picked_B[:, None], 0.0)
        return onehot


def inverse_cdf_sample(probs_BV: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One id per row, drawn from row ``b`` of the (not necessarily normalised) ``probs_BV``
    with ``generators[b]``: the first id whose cumulative mass exceeds ``u * total``, ``u``
    uniform in [0, 1). Ids of zero mass are never drawn. Float64 sums keep the rounding far
    below any probability float32 can represent."""
    u_B = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf_BV = probs_BV.to(torch.float64).cumsum(-1)
    target_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1])[:, None]
    picked_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1)
    return picked_B.clamp(max=probs_BV.shape[-1] - 1)


class _StopWhenAsked(StoppingCriteria):
    """Ends generation early once a stop was requested (SIGTERM/SIGINT, :mod:`kdrl.stop`); the
    caller then abandons the step."""

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = stop.abandoning()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class HFRollout:
    """Sampling with ``transformers`` ``generate`` (KV cache) on the training model itself."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        synced: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        # A sharded (FSDP2) model gathers its weights in every forward: all ranks must keep
        # stepping until the last one is done (`synced_gpus`).
        self.synced = synced

    def sync_weights(self, model: PreTrainedModel) -> None:
        self.model = model  # same process, same parameters: nothing to copy

    def close(self) -> None:
        pass  # generate() holds nothing between calls

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], *, n_samples: int, seed: int | None = None
    ) -> RolloutBatch:
        prompt_ids = [p.ids for p in prompts for _ in range(n_samples)]
        index = [p.index for p in prompts for _ in range(n_samples)]
        generators = None
        if seed is not None and self.temperature > 0:
            generators = [
                torch.Generator().manual_seed(sequence_seed(seed, p.index, j))
                for p in prompts for j in range(n_samples)
            ]  # fmt: skip
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(ids) for ids in prompt_ids)
        left = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attn = torch.zeros_like(left)
        for b, ids in enumerate(prompt_ids):
            left[b, width - len(ids) :] = torch.tensor(ids)
            attn[b, width - len(ids) :] = 1
        recorder = _SampleAndRecord(
            temperature=self.temperature,
            top_p=self.top_p,
            vocab=len(self.tokenizer),
            generators=generators,
        )
        # top_k=0 disables top-k when sampling (None would become the library default of 50).
        # With per-sequence generators the processor already picked the token (a one-hot
        # distribution), so generate() need not draw again: its argmax is that token.
        sample = self.temperature > 0 and generators is None
        config = GenerationConfig(
            do_sample=sample, temperature=1.0, top_p=1.0, top_k=0 if sample else None,
            max_new_tokens=self.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        # generate() fills every field left unset from the model's own generation_config, so a
        # checkpoint's sampling defaults (repetition_penalty, min_p, ...) would silently change
        # the distribution: give it a neutral one for the call.
        saved_defaults, was_training = self.model.generation_config, self.model.training
        self.model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
        self.model.eval()
        device = self.model.device
        stopping = StoppingCriteriaList([_StopWhenAsked()] if stop.may_abandon() else [])
        try:
            out = self.model.generate(
                input_ids=left.to(device), attention_mask=attn.to(device),
                generation_config=config, logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=stopping, synced_gpus=self.synced,
            )  # fmt: skip
        finally:
            self.model.generation_config = saved_defaults
            self.model.train(was_training)
        stop.abandon_point()  # generation may have been cut short: these samples are unusable
        recorder.record(out[:, -1])
        new_tokens = out[:, width:].cpu()
        behav = torch.stack(recorder.recorded, 1).cpu() if recorder.recorded else None
        return _layout(prompt_ids, index, new_tokens, behav, eos, pad, self.tokenizer)


def _layout(prompt_ids, index, new_tokens_BN, behav_BN, eos, pad, tokenizer) -> RolloutBatch:
    """Right-padded ``[prompt | response]`` rows from left-padded ``generate`` output."""
    b, n = new_tokens_BN.shape
    is_eos = new_tokens_BN == eos
    has_eos = is_eos.any(1)
    # The response ends at its first EOS (kept: the student must learn to stop); later ids are
    # generate's padding, which may equal EOS.
    resp_len = torch.where(has_eos, is_eos.float().argmax(1) + 1, torch.full((b,), n))
    total = [len(p) + int(r) for p, r in zip(prompt_ids, resp_len, strict=True)]
    ids = torch.full((b, max(total)), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    behav = torch.zeros(ids.shape, dtype=torch.float32)
    texts = []
    for row, (p, r) in enumerate(zip(prompt_ids, resp_len.tolist(), strict=True)):
        ids[row, : len(p)] = torch.tensor(p)
        ids[row, len(p) : len(p) + r] = new_tokens_BN[row, :r]
        attn[row, : len(p) + r] = 1
        resp_mask[row, len(p) : len(p) + r] = True
        if behav_BN is not None:
            behav[row, len(p) : len(p) + r] = behav_BN[row, :r]
        texts.append(tokenizer.decode(new_tokens_BN[row, :r], skip_special_tokens=True))
    return RolloutBatch(
        input_ids_BT=ids, attention_mask_BT=attn, response_mask_BT=resp_mask,
        behav_logprobs_BT=behav, prompt_index_B=list(index), truncated_B=~has_eos,
        response_texts=texts,
    )  # fmt: skip
