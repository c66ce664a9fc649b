"""Data-parallel training under ``torchrun``: the process group, the student's wrapper (FSDP2,
or DDP as a fallback), collective reductions and full state dicts for single-file checkpoints.

Launched without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op and the
same code path runs in one process. Under ``torchrun`` every rank holds a full copy of the
teacher (or talks to a teacher server) and a shard (FSDP2) or copy (DDP) of the student; each
rank samples and scores its own share of the prompts, and gradients meet in the wrapper's
reduce. Sharding is strided (rank ``r`` takes prompts ``r, r + N, ...``) so that the ``i``-th
PPO minibatch of every rank together is exactly the ``i``-th minibatch of one process.
"""

from __future__ import annotations

import datetime
import gc
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL_STRATEGIES = ("fsdp", "ddp")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel world."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"
    """``fsdp`` or ``ddp`` under torchrun; ``none`` in a single process."""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's strided share of a global batch."""
        return items[self.rank :: self.world]


SINGLE = DistContext()


def init_from_env(strategy: str, device: str = "cpu") -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a single process
    otherwise. NCCL when the student lives on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if strategy not in PARALLEL_STRATEGIES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_STRATEGIES}, got {strategy!r}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("KDRL_DIST_TIMEOUT_MIN", "30")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return DistContext(rank=rank, world=world, local_rank=local_rank, strategy=strategy)


def shutdown(ctx: DistContext, error: BaseException | None = None) -> None:
    """Leave the process group (a vLLM engine's ``close`` may already have destroyed it).

    Whatever still holds the group must go first: a DDP wrapper freed after
    ``destroy_process_group`` hangs for good in Gloo's destructor (its ``Reducer`` owns the
    group). An ``error`` on its way out keeps the frames it passed through, and with them the
    run and its wrapper, alive until the command line handles it: their locals are cleared
    (the traceback itself stays printable) and the cycles collected before the group goes."""
    if not (ctx.enabled and dist.is_initialized()):
        return
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    dist.destroy_process_group()


def device_for(ctx: DistContext, device: str) -> str:
    """Each rank's own GPU under torchrun (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    if ctx.enabled and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


def wrap_student(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """FSDP2 (``fully_shard`` each decoder layer, then the whole model) or DDP. FSDP2 keeps the
    module's class and methods (``generate`` works, all ranks stepping together); DDP returns a
    wrapper whose ``.module`` is the Hugging Face model."""
    if not ctx.enabled:
        return model
    if ctx.strategy == "ddp":
        ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
        # No buffer broadcast in forward: it is a collective, and ranks run different numbers of
        # forward passes (generation lengths differ).
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (ctx.world,))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (``model.model.layers`` for Llama, Qwen,
    Mistral, ...); an empty list shards the model as one unit."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    """True under FSDP2: every forward all-gathers parameters, so all ranks must run the same
    number of forward passes (generation uses ``synced_gpus``, micro-batches are padded)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def no_grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) while ``enabled``."""
    if not enabled:
        yield
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield  # a single process: nothing to hold back


def all_reduce(values: list[float], ctx: DistContext, op: str = "sum") -> list[float]:
    """Element-wise sum/max/min of ``values`` over ranks, in one collective (float64)."""
    if not ctx.enabled:
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=ops[op])
    return tensor.cpu().tolist()


def reduce_metrics(
    sums: dict[str, float], ctx: DistContext, *, maxes: dict[str, float] | None = None
) -> dict[str, float]:
    """The one place metrics meet: ``sums`` are added over ranks, ``maxes`` take the largest
    (e.g. wall times: the step takes as long as its slowest rank). Keys must match on all ranks."""
    maxes = maxes or {}
    if not ctx.enabled:
        return {**sums, **maxes}
    keys, mkeys = sorted(sums), sorted(maxes)
    added = all_reduce([sums[k] for k in keys], ctx, "sum")
    largest = all_reduce([maxes[k] for k in mkeys], ctx, "max") if mkeys else []
    return dict(zip(keys, added, strict=True)) | dict(zip(mkeys, largest, strict=True))


def all_gather_objects(obj: object, ctx: DistContext) -> list[object]:
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded, on the CPU, under Hugging Face names. A collective
    under FSDP2 (every rank must call it); rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def full_optimizer_state_dict(model: torch.nn.Module, optimizer, ctx: DistContext) -> dict | None:
    """The optimizer's state keyed by parameter name, unsharded, so a checkpoint resumes at any
    world size. A collective under torchrun; rank 0 gets the tensors. (Decided by ``ctx``, not
    by ``dist.is_initialized()``: an in-process vLLM engine initialises a world of one.)

    None before the first optimizer step (every step so far skipped as non-finite): torch fills
    an empty state with a zero-gradient step, which would count as an AdamW step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:  # alike on every rank: optimizer steps are global
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if ctx.enabled else None
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def load_full_optimizer_state_dict(
    model: torch.nn.Module, optimizer, state: dict | None, ctx: DistContext
) -> None:
    """Load what :func:`full_optimizer_state_dict` saved; each rank keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state is None:  # saved before the first optimizer step: a new optimizer is that state
        return
    options = StateDictOptions(full_state_dict=True) if ctx.enabled else None
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=options)
