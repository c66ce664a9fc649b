"""On-policy sampling with vLLM, in the trainer's own process (``rollout.backend: vllm``).

Shape legend: ``B`` sequences (prompts x samples), ``N`` new tokens of the longest response.

The engine loads the student's initial weights from its folder once; after every optimizer step
:meth:`VLLMRollout.sync_weights` copies the trainer's current tensors into the running engine
(no disk, no restart) and drops the prefix cache, whose KV entries were computed with the old
weights. The sampling distribution is the one :class:`kdrl.rollout.HFRollout` samples from:
``softmax(top_p(logits / temperature))`` with ids past ``len(tokenizer)`` (padded embedding rows)
masked first, no top-k, min-p or penalties, none of the checkpoint's ``generation_config``
defaults; a response ends at the first EOS (kept) or after ``max_new_tokens``. The engine runs
with ``logprobs_mode="processed_logprobs"``, so the log-prob it reports for a sampled token is
taken from that same distribution (after temperature and top-p), which is what the loss needs
as the behaviour log-prob.

The engine lives in this process (``distributed_executor_backend="external_launcher"``,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight sync is a tensor copy, not an RPC. That has
consequences for the process, documented in ``docs/vllm-rollout.md``: vLLM initialises
``torch.distributed`` (a world of one, gloo, on a free local port) unless it already is; under
``torchrun`` it joins the existing group and every rank must build its engine at the same time
(construction runs collectives); each rank then samples on its own.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdrl.data import Prompt
from kdrl.rollout import RolloutBatch, _layout, sequence_seed

INSTALL_HINT = "rollout.backend: vllm needs `pip install 'kdrl[vllm]'`"
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.inplace"
# What the sampling semantics and the weight sync rely on; engine_kwargs cannot change them.
_ENGINE_SETTINGS = {
    "model", "dtype", "seed", "distributed_executor_backend", "logprobs_mode",
    "generation_config", "skip_tokenizer_init", "max_model_len", "enforce_eager",
    "gpu_memory_utilization", "kv_cache_memory_bytes",
}  # fmt: skip


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


class VLLMRollout:
    """Sampling with an in-process vLLM engine; implements :class:`kdrl.rollout.Rollout`.

    ``model_path`` is the student's Hugging Face folder (the engine's initial weights); ``dtype``
    must be the trainer's dtype (vLLM on CPU would otherwise pick bfloat16, and the recorded
    log-probs would then not be the trainer's). ``kv_cache_gb`` sizes the KV cache explicitly
    (vLLM's ``kv_cache_memory_bytes``; on the CPU the default is 1 GiB unless
    ``VLLM_CPU_KVCACHE_SPACE`` is set); otherwise ``gpu_memory_utilization`` is the fraction of
    GPU memory vLLM may take, to be left small enough for the trainer beside it.
    ``engine_kwargs`` go to ``vllm.LLM`` as they are (e.g. ``block_size``).
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Any,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        dtype: torch.dtype | str,
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gb: float | None = None,
        enforce_eager: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_sampling(temperature, top_p, max_new_tokens)
        reserved = _ENGINE_SETTINGS & set(engine_kwargs or {})
        if reserved:
            raise ValueError(f"engine_kwargs may not set {sorted(reserved)}: VLLMRollout does")
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.dtype = _dtype_name(dtype)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        if kv_cache_gb is None and current_platform.is_cpu():
            # vLLM's own CPU default reserves a fraction of all RAM; its legacy variable
            # VLLM_CPU_KVCACHE_SPACE (GiB), when set, overrides this in any case.
            kv_cache_gb = 1.0
        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=self.dtype, max_model_len=max_model_len, seed=seed,
            enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
            distributed_executor_backend="external_launcher",
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the checkpoint's sampling defaults stay out
            skip_tokenizer_init=True,  # kdrl tokenizes and decodes; stops are token ids
        )  # fmt: skip
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        kwargs.update(engine_kwargs or {})
        with _in_process_engine_env(), _guest_in_this_process():
            self.llm = vllm.LLM(**kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab_rows = self.llm.llm_engine.model_config.get_vocab_size()
        # Ids past the tokenizer are padded embedding rows: never sampled, never in the support.
        # A -inf logit bias is applied before temperature and top-p, as HFRollout masks them.
        n_tok = len(tokenizer)
        padded = range(n_tok, self.vocab_rows)
        self._mask_padded = {i: -float("inf") for i in padded} if len(padded) else None

    def with_sampling(
        self, *, temperature: float, top_p: float, max_new_tokens: int | None = None
    ) -> VLLMRollout:
        """The same engine with other sampling settings (e.g. greedy evaluation answers):
        sampling settings travel with each request, so no second engine is needed."""
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_sampling(temperature, top_p, max_new_tokens)
        other = copy.copy(self)
        other.temperature, other.top_p, other.max_new_tokens = temperature, top_p, max_new_tokens
        return other

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Copy ``model``'s current weights (Hugging Face names) into the engine, then drop the
        prefix cache. Under FSDP2 the shards are gathered one tensor at a time (a collective:
        every rank calls this)."""
        _push_weights(self.llm, _full_tensors(model.state_dict()))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache (requests still running?)")

    def close(self) -> None:
        """Shut the engine down now, before the trainer's own ``torch.distributed`` teardown.

        vLLM's engine teardown (here, or at garbage collection / interpreter exit) destroys
        torch.distributed's default process group, which under ``torchrun`` is the trainer's
        own: call this after the trainer's last collective, in place of its own
        ``destroy_process_group`` (kdrl's ``distributed.shutdown`` then finds nothing to do).
        Left to interpreter exit after the trainer destroyed the group, vLLM's finalizer
        prints an "Invalid process group specified" traceback."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def generate(
        self, prompts: list[Prompt], *, n_samples: int, seed: int | None = None
    ) -> RolloutBatch:
        """``n_samples`` answers per prompt, one vLLM request per sequence; with ``seed`` the
        request of sample ``j`` of prompt ``p`` carries the seed ``sequence_seed(seed, p.index,
        j)``, so what a sequence draws does not depend on the rest of the batch."""
        vllm = _import_vllm()
        prompt_ids = [p.ids for p in prompts for _ in range(n_samples)]
        index = [p.index for p in prompts for _ in range(n_samples)]
        for p in prompts:
            if len(p.ids) + self.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {p.index} has {len(p.ids)} tokens; with rollout.max_new_tokens="
                    f"{self.max_new_tokens} it exceeds the engine's max_model_len="
                    f"{self.max_model_len}"
                )
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        params = [
            vllm.SamplingParams(
                n=1, temperature=self.temperature, top_p=self.top_p, top_k=0, min_p=0.0,
                repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                max_tokens=self.max_new_tokens, min_tokens=0,
                # Only the tokenizer's EOS stops (as in HFRollout), and it is returned.
                ignore_eos=True, stop_token_ids=[eos], logprobs=0, detokenize=False,
                logit_bias=self._mask_padded,
                seed=None if seed is None else sequence_seed(seed, p.index, j),
            )
            for p in prompts
            for j in range(n_samples)
        ]  # fmt: skip
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return self._to_batch(outputs, prompt_ids, index, eos, pad)

    def _to_batch(self, outputs, prompt_ids, index, eos: int, pad: int) -> RolloutBatch:
        """vLLM's outputs laid out by :func:`kdrl.rollout._layout`, so both backends agree."""
        b = len(outputs)
        completions = [out.outputs[0] for out in outputs]
        n = max(len(c.token_ids) for c in completions)
        new_tokens_BN = torch.full((b, n), pad, dtype=torch.long)
        behav_BN = torch.zeros((b, n), dtype=torch.float32)
        for row, c in enumerate(completions):
            ids = list(c.token_ids)
            ended = len(ids) > 0 and ids[-1] == eos
            if not (ended or len(ids) == self.max_new_tokens) or eos in ids[:-1]:
                # _layout reads a row without EOS as truncated at max_new_tokens.
                raise RuntimeError(
                    f"vLLM stopped sequence {row} after {len(ids)} tokens "
                    f"(finish_reason={c.finish_reason!r}), neither at EOS nor at max_new_tokens"
                )
            new_tokens_BN[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            behav_BN[row, : len(ids)] = torch.tensor(
                [lp[t].logprob for t, lp in zip(ids, c.logprobs, strict=True)]
            )
        return _layout(prompt_ids, index, new_tokens_BN, behav_BN, eos, pad, self.tokenizer)


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; got {temperature}, "
            f"{top_p}, {max_new_tokens}"
        )
    if temperature == 0 and top_p < 1:
        # vLLM's greedy path reports log-probs before top-p, HFRollout's after it.
        raise ValueError("temperature 0 (greedy) with top_p < 1 is not supported by vLLM")


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (the trainer's), got {dtype}")
    return name


def _full_tensors(state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs, each sharded (DTensor) tensor gathered when it is reached, so
    only one full tensor at a time exists beside the shards."""
    for name, tensor in state.items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, full.detach()


def _push_weights(llm: Any, weights: Iterator[tuple[str, Tensor]]) -> None:
    """The one place that uses vLLM internals: the worker's in-place ``reload_weights`` (vLLM
    0.32: ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``), which runs
    the model's own ``load_weights`` (Hugging Face names, fused q/k/v and gate/up) and then
    re-does the post-load processing (e.g. oneDNN prepacking on the CPU).

    vLLM only logs a warning for model weights the iterator did not provide; a partial update
    would silently train one model and sample from another, so that warning is an error here.
    """
    missing: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not loaded" in record.getMessage():
                missing.append(record.getMessage())

    handler = _Catch(logging.WARNING)
    reload_logger = logging.getLogger(_RELOAD_LOGGER)
    reload_logger.addHandler(handler)
    try:
        llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
    except (AttributeError, NotImplementedError, TypeError) as err:
        import vllm

        raise RuntimeError(
            f"kdrl's weight sync calls vLLM's internal Worker.reload_weights(weights_iterator=...,"
            f" is_checkpoint_format=True), written against vllm 0.32; vllm {vllm.__version__} "
            f"does not accept it ({err}). Pin the vllm version of kdrl's `vllm` extra."
        ) from err
    finally:
        reload_logger.removeHandler(handler)
    if missing:
        raise RuntimeError(f"weight sync did not cover every engine weight: {missing[0]}")


@contextmanager
def _in_process_engine_env() -> Iterator[None]:
    """The environment vLLM's ``external_launcher`` reads: one engine per process, no engine
    subprocess. Outside ``torchrun`` this process is rank 0 of a world of one on a free port,
    for the engine's construction only; under ``torchrun`` (or any launcher that set them) the
    variables are left as they are."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        needed = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
        if needed:
            raise RuntimeError(
                f"torch.distributed is initialised but {needed} are not set: the in-process "
                "vLLM engine joins the existing process group and needs them (torchrun sets them)"
            )
        yield
        return
    defaults = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        # Only engine construction reads them; left behind, a child process (a test's `kdrl
        # train`, a torchrun) would inherit this world's port and fail with EADDRINUSE.
        for key in added:
            os.environ.pop(key, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _guest_in_this_process() -> Iterator[None]:
    """Undo what building the engine does to the rest of the process: vLLM reseeds the global
    RNGs (torch, numpy, random) with its own seed and, on the CPU, replaces
    ``torch.set_num_threads`` with a no-op (it guards the thread binding of its own worker
    processes, which the in-process engine does not have)."""
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
