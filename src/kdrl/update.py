"""One policy update on a rollout batch: minibatches of optimizer steps, each accumulated over
token-budget micro-batches.

Non-finite values are checked before every optimizer step: a minibatch whose loss (any
micro-batch) or gradient norm is nan/inf takes no optimizer or LR-schedule step, and its
gradients are dropped. The guarantee is per optimizer step: the weights, the optimizer state and
the scheduler are exactly as the previous minibatch's step left them, and the steps of earlier
minibatches of the same update stand. By default the update then raises `NonFiniteError`; an
``on_nonfinite`` callback may instead let it go on with the next minibatch (a skipped step).

Shape legend: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``K`` teacher top-k. Inside a
micro-batch every ``*_BT`` tensor covers the micro-batch's response window (`kdrl.forward`):
column ``j`` is about token ``window.start + j``, predicted by the logits at the position
before it.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kdrl.distributed import SINGLE, DistContext, all_reduce, no_grad_sync, reduce_metrics
from kdrl.divergences import DIVERGENCES
from kdrl.forward import response_window, window_logits
from kdrl.fused import fused_eligible, window_token_logprobs
from kdrl.grpo import sequence_to_tokens
from kdrl.logprobs import token_logprobs
from kdrl.loss import TeacherDistribution, kdrl_loss
from kdrl.masking import masked_sum
from kdrl.microbatch import token_budget_microbatches
from kdrl.nonfinite import NonFinite, NonFiniteError
from kdrl.rollout import RolloutBatch
from kdrl.teacher import TeacherOutput


@dataclass
class LossSettings:
    """The loss knobs of one update (the distillation weight may follow a schedule)."""

    rl_loss_weight: float
    distill_loss_weight: float
    kd_estimator: str
    kd_discount: float
    kd_eps_clip: float | None
    jsd_beta: float
    student_temperature: float
    eps_clip: float
    eps_clip_higher: float | None
    c_clip: float | None
    vocab: int | None = None
    """Ids the student's distribution is normalised over (`kdrl.models.support_size`, the ids
    the sampler can draw); None keeps every output row."""


@dataclass
class UpdateBatch:
    rollout: RolloutBatch
    teacher: TeacherOutput
    advantages_B: Tensor
    kd_weights_B: Tensor


def _forward_logprobs(
    model, rollout: RolloutBatch, rows: list[int], temperature: float, vocab, *, need_logits: bool
):
    """Log-probs and entropy of the tokens in the response window of ``rows``, and the student
    logits (cut to ``vocab`` ids) when ``need_logits``. Without them, an eligible model never
    builds its ``[B, T, V]`` logits (`kdrl.fused`) and ``None`` is returned in their place."""
    window = response_window(rollout, rows)
    if not need_logits and fused_eligible(model):
        lp_BT, ent_BT = window_token_logprobs(
            model, rollout, window, temperature=temperature, vocab=vocab, with_entropy=True
        )
        return None, lp_BT, ent_BT, window
    logits_BTV = window_logits(model, rollout, window)[..., :vocab]
    ids_BT = window.take(rollout.input_ids_BT, logits_BTV.device)
    lp_BT, ent_BT = token_logprobs(logits_BTV, ids_BT, temperature=temperature, with_entropy=True)
    return logits_BTV, lp_BT, ent_BT, window


def _padded_microbatches(lengths: list[int], max_tokens: int, ctx: DistContext):
    """Token-budget micro-batches, then as many repeats of the first as it takes for every rank
    to run the same number of forward/backward passes (FSDP2 gathers parameters in each one).
    Yields ``(rows, is_padding)``."""
    # Each group in row order: a run of consecutive rows reads its window as a view.
    groups = [sorted(g) for g in token_budget_microbatches(lengths, max_tokens)]
    (most,) = all_reduce([len(groups)], ctx, "max")
    return [(g, False) for g in groups] + [(groups[0], True)] * (int(most) - len(groups))


@torch.no_grad()
def recompute_logprobs(
    model, rollout: RolloutBatch, *, temperature: float, max_tokens: int, ctx=SINGLE, vocab=None
):
    """Log-probs of every token under the current student (PPO's "old" policy), ``[B, T]``."""
    out = torch.zeros(rollout.input_ids_BT.shape, dtype=torch.float32)
    lengths = rollout.attention_mask_BT.sum(1).tolist()
    for rows, padding in _padded_microbatches(lengths, max_tokens, ctx):
        _, lp_BT, _, window = _forward_logprobs(
            model, rollout, rows, temperature, vocab, need_logits=False
        )
        if not padding:
            out[rows, window.start : window.stop] = lp_BT.cpu()
    return out


def _microbatch_loss(model, data: UpdateBatch, rows, old_BT, s: LossSettings, num_tokens):
    r = data.rollout
    # Full-distribution divergences read the student's logits; every other loss needs only the
    # log-probs of the sampled tokens.
    full = s.kd_estimator in DIVERGENCES and s.distill_loss_weight > 0
    logits_BTV, lp_BT, ent_BT, window = _forward_logprobs(
        model, r, rows, s.student_temperature, s.vocab, need_logits=full
    )
    device = lp_BT.device

    def take(x: Tensor) -> Tensor:
        return window.take(x, device)

    mask_BT = take(r.response_mask_BT)
    teacher = data.teacher
    distribution = None
    if full:
        assert logits_BTV is not None
        assert teacher.topk_logprobs_BTK is not None and teacher.topk_ids_BTK is not None
        distribution = TeacherDistribution(
            logits_BTV, take(teacher.topk_logprobs_BTK), take(teacher.topk_ids_BTK)
        )
    old = lp_BT.detach() if old_BT is None else take(old_BT)
    loss, metrics = kdrl_loss(
        lp_BT, old, take(teacher.logprobs_BT),
        sequence_to_tokens(data.advantages_B[rows].to(device), mask_BT), mask_BT,
        rl_loss_weight=s.rl_loss_weight, distill_loss_weight=s.distill_loss_weight,
        kd_estimator=s.kd_estimator, kd_discount=s.kd_discount, kd_eps_clip=s.kd_eps_clip,
        kd_weights_BT=sequence_to_tokens(data.kd_weights_B[rows].to(device), mask_BT),
        distribution=distribution, jsd_beta=s.jsd_beta,
        student_temperature=s.student_temperature, eps_clip=s.eps_clip,
        eps_clip_higher=s.eps_clip_higher, c_clip=s.c_clip, num_tokens=num_tokens,
    )  # fmt: skip
    metrics["actor/entropy"] = masked_sum(ent_BT.detach(), mask_BT).item() / num_tokens
    # Sampler vs trainer: mean |log pi_theta - log mu| over the tokens. ~1e-6 for the first
    # minibatch when the sampler has the trainer's weights (float32); later minibatches add the
    # policy's own drift. A large value means the engine samples from another policy.
    gap_BT = (lp_BT.detach() - take(r.behav_logprobs_BT)).abs()
    metrics["actor/behav_logprob_gap"] = masked_sum(gap_BT, mask_BT).item() / num_tokens
    return loss, metrics


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: UpdateBatch,
    settings: LossSettings,
    *,
    n_minibatches: int,
    max_tokens_per_mb: int,
    max_grad_norm: float,
    ctx: DistContext = SINGLE,
    on_nonfinite: Callable[[NonFinite], None] | None = None,
) -> dict[str, float]:
    """``n_minibatches`` optimizer steps over consecutive shares of the batch. Each step's loss
    is normalised by its share's response-token count; metrics are averaged over the steps taken.

    A minibatch with a non-finite loss or gradient norm takes no step (module docstring): with
    ``on_nonfinite`` None that raises `NonFiniteError`; otherwise ``on_nonfinite`` is called
    with what was found (it may raise to stop) and the update goes on without that step.

    Under data parallelism (``ctx``) ``data`` is this rank's share: the token count is summed
    over ranks and each rank's loss multiplied by the world size (the wrapper averages
    gradients), so the update equals one process's on the global batch.
    """
    b = data.rollout.num_sequences
    if not 1 <= n_minibatches <= b:
        raise ValueError(f"ppo_n_minibatches must be in [1, {b}] for {b} sequences")
    old_BT = None
    if n_minibatches > 1:  # later minibatches are off-policy: keep the pre-update log-probs
        old_BT = recompute_logprobs(
            model, data.rollout, temperature=settings.student_temperature,
            max_tokens=max_tokens_per_mb, ctx=ctx, vocab=settings.vocab,
        )  # fmt: skip
    bounds = [round(i * b / n_minibatches) for i in range(n_minibatches + 1)]
    totals: dict[str, float] = defaultdict(float)
    # The optimizer's own list: under FSDP2, `model.parameters()` may return the root module's
    # unsharded views between a forward and the reshard, which never receive gradients.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    skipped = 0
    for minibatch, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        share = list(range(lo, hi))
        (num_tokens,) = all_reduce([float(data.rollout.response_mask_BT[share, 1:].sum())], ctx)
        num_tokens = max(num_tokens, 1.0)
        lengths = data.rollout.attention_mask_BT[share].sum(1).tolist()
        groups = _padded_microbatches(lengths, max_tokens_per_mb, ctx)
        found: NonFinite | None = None
        taken: list[dict[str, float]] = []
        for i, (group, padding) in enumerate(groups):
            rows = [share[j] for j in group]
            with no_grad_sync(model, enabled=i < len(groups) - 1):
                loss, metrics = _microbatch_loss(model, data, rows, old_BT, settings, num_tokens)
                if found is None:
                    found = _check_loss(metrics, ctx, minibatch, n_minibatches)
                # A bad minibatch still runs all its passes, so that the data-parallel wrappers'
                # gradient collectives line up (and FSDP2 flushes what it accumulated); its
                # gradients are dropped before any optimizer step.
                (loss * (0.0 if padding else ctx.world)).backward()
            if not padding:
                taken.append(metrics)
        if found is None:
            clip = max_grad_norm if max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # Under FSDP2 the norm is a DTensor over the shards; its full value is the global norm.
            grad_norm = float(
                grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            )
            if not math.isfinite(grad_norm):
                found = NonFinite("optim/grad_norm", grad_norm, minibatch, n_minibatches)
        if found is not None:  # every rank found it: the checks are global
            optimizer.zero_grad(set_to_none=True)
            if on_nonfinite is None:
                raise NonFiniteError(
                    f"non-finite {found}: stopped before the optimizer step", found
                )
            on_nonfinite(found)
            skipped += 1
            continue
        for metrics in taken:
            for key, value in metrics.items():
                totals[key] += value / n_minibatches
        totals["optim/grad_norm"] += grad_norm / n_minibatches
        totals["optim/lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if 0 < skipped < n_minibatches:  # averages over the steps taken
        scale = n_minibatches / (n_minibatches - skipped)
        totals = {k: v if k == "optim/lr" else v * scale for k, v in totals.items()}
    # Loss-type metrics are token sums over the global count: adding the ranks' shares gives the
    # global value. The gradient norm and learning rate are already global.
    optim = {k: v for k, v in totals.items() if k.startswith("optim/")}
    return reduce_metrics({k: v for k, v in totals.items() if k not in optim}, ctx) | optim


def _check_loss(
    metrics: dict[str, float], ctx: DistContext, minibatch: int, n_minibatches: int
) -> NonFinite | None:
    """What is non-finite in a micro-batch's loss on any rank (one collective), or None."""
    (bad,) = all_reduce([0.0 if math.isfinite(metrics["loss/total"]) else 1.0], ctx, "max")
    if not bad:
        return None
    terms = [k for k in metrics if k.startswith("loss/") and k != "loss/total"] + ["loss/total"]
    for key in terms:
        if not math.isfinite(metrics[key]):
            return NonFinite(key, metrics[key], minibatch, n_minibatches)
    return NonFinite("loss/total", math.nan, minibatch, n_minibatches, elsewhere=True)
