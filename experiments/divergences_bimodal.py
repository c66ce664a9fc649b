"""Experiment 3a (see divergences.py): one answer token, a bimodal teacher, a unimodal student.

Also the pieces every part of experiment 3 shares: an :class:`Arm` (one training signal) and
:func:`kd_loss`, which turns an arm into `kdrl.loss.kdrl_loss` on the student's own samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdrl.loss import TeacherDistribution, kdrl_loss


@dataclass(frozen=True)
class Arm:
    """One training signal: ``sft`` (cross-entropy on teacher samples) or a kdrl estimator."""

    name: str
    estimator: str  # "sft" or a teacher.kd_estimator: pg, forward_kl, reverse_kl, jsd
    discount: float = 0.0  # teacher.kd_discount (pg only)
    beta: float = 0.5  # teacher.jsd_beta (jsd only)


def kd_loss(arm: Arm, logits_BTV: Tensor, ids_BT: Tensor, teacher_BTV: Tensor, mask_BT: Tensor):
    """The arm's loss on the student's own samples ``ids_BT`` through `kdrl.loss.kdrl_loss`
    (pure distillation). ``teacher_BTV`` are the teacher's log-probs at each sampled prefix."""
    logq_BTV = logits_BTV.log_softmax(-1)
    lq_BT = logq_BTV.gather(-1, ids_BT[..., None]).squeeze(-1)
    lp_BT = teacher_BTV.gather(-1, ids_BT[..., None]).squeeze(-1)
    v = logits_BTV.shape[-1]
    dist = TeacherDistribution(logits_BTV, teacher_BTV, torch.arange(v).expand(*ids_BT.shape, v))
    loss, _ = kdrl_loss(
        lq_BT, lq_BT.detach(), lp_BT, None, mask_BT, rl_loss_weight=0.0, distill_loss_weight=1.0,
        kd_estimator=arm.estimator, kd_discount=arm.discount, jsd_beta=arm.beta,
        distribution=None if arm.estimator == "pg" else dist, num_tokens=float(mask_BT.sum()),
    )  # fmt: skip
    return loss


# ---------------------------------------------------------------- 3a: one token, two modes


@dataclass
class Bimodal:
    """Settings of part 3a (the teacher, the student and the optimisation)."""

    vocab: int = 64
    prompts: int = 64
    teacher_sd: float = 2.0
    gap: tuple[int, int] = (30, 36)
    floor: float = 1e-10  # uniform mass mixed into the teacher (an ablation uses 1e-3)
    student_sd0: float = 8.0
    steps: int = 400
    lr: float = 0.05
    samples: int = 16  # per prompt and step, for the sampled arms (sft, pg)
    support: float = 1e-3  # precision counts student mass where the teacher has >= this


ARMS_3A = [
    Arm("forward_kl", "forward_kl"),
    Arm("sft", "sft"),
    Arm("jsd_0.1", "jsd", beta=0.1),
    Arm("jsd_0.5", "jsd", beta=0.5),
    Arm("jsd_0.9", "jsd", beta=0.9),
    Arm("reverse_kl", "reverse_kl"),
    Arm("pg", "pg"),
]


def bimodal_teacher(cfg: Bimodal, seed: int) -> tuple[Tensor, Tensor]:
    """``(log p [P, V], modes [P, 2])``: 0.5 N(lo, sd) + 0.5 N(hi, sd) discretised over the ids,
    ``hi - lo`` drawn from ``cfg.gap``, with ``cfg.floor`` of uniform mass mixed in."""
    g = torch.Generator().manual_seed(10_000 + seed)
    gap = torch.randint(cfg.gap[0], cfg.gap[1] + 1, (cfg.prompts,), generator=g)
    lo = torch.stack([torch.randint(5, cfg.vocab - 5 - int(d), (), generator=g) for d in gap])
    modes = torch.stack([lo, lo + gap], 1).double()
    v = torch.arange(cfg.vocab, dtype=torch.float64)
    comp = -((v - modes[..., None]) ** 2) / (2 * cfg.teacher_sd**2)  # [P, 2, V]
    mix = comp.logsumexp(1).log_softmax(-1)
    floor = torch.full_like(mix, math.log(cfg.floor / cfg.vocab))
    return torch.logaddexp(mix + math.log1p(-cfg.floor), floor).float(), modes.float()


class GaussianHead(nn.Module):
    """A student that can only be unimodal: ``logit_v = -(v - mu)^2 / (2 s^2)`` per prompt, with
    ``mu`` and ``s`` from a small MLP on a learned prompt embedding (the prompt is one token, so
    attention would add nothing). Starts near the middle with ``s = student_sd0``."""

    def __init__(self, cfg: Bimodal, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = cfg.vocab
        self.embed = nn.Embedding(cfg.prompts, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
        with torch.no_grad():
            self.body[-1].weight.mul_(0.1)
            self.body[-1].bias.copy_(torch.tensor([0.0, math.log(cfg.student_sd0)]))

    def forward(self) -> Tensor:
        """Logits ``[P, V]``."""
        a, b = self.body(self.embed.weight).unbind(-1)
        mu = (self.vocab - 1) / 2 + 10 * a
        sd = b.clamp(math.log(0.3), math.log(200.0)).exp()
        v = torch.arange(self.vocab, dtype=torch.float32)
        return -((v - mu[:, None]) ** 2) / (2 * sd[:, None] ** 2)


def bimodal_metrics(cfg: Bimodal, logits: Tensor, teacher: Tensor, modes: Tensor) -> dict:
    """Precision: student mass where ``p_T >= cfg.support``. Coverage: teacher modes holding
    >= 10% of the student's mass (each id counts for its nearer mode). ``sd``, ``broad`` and
    ``between`` describe the student's distribution over the ids: its standard deviation
    (median over prompts), the share of prompts where that exceeds 3 teacher sd, and the share
    whose mean lies between the modes, 3 teacher sd from both. ``upper_mode_frac``: share of
    prompts where the higher mode holds more student mass (about 0.5 if the choice is random)."""
    q, logq = logits.softmax(-1), logits.log_softmax(-1)
    support = teacher.exp() >= cfg.support
    v = torch.arange(cfg.vocab).float()
    upper = (v - modes[:, :1]).abs() > (v - modes[:, 1:]).abs()  # nearer the higher mode
    mass_lo, mass_hi = (q * support * ~upper).sum(-1), (q * support * upper).sum(-1)
    p = teacher.exp()
    mean = (q * v).sum(-1)
    sd = ((q * (v - mean[:, None]) ** 2).sum(-1)).sqrt()
    margin = 3 * cfg.teacher_sd
    between = (mean > modes[:, 0] + margin) & (mean < modes[:, 1] - margin)
    return {
        "precision": (q * support).sum(-1).mean().item(),
        "coverage": ((mass_lo >= 0.1).float() + (mass_hi >= 0.1).float()).mean().item(),
        "sd": sd.median().item(),
        "broad": (sd > margin).float().mean().item(),
        "between": between.float().mean().item(),
        "forward_kl": (p * (teacher - logq)).sum(-1).mean().item(),
        "reverse_kl": (q * (logq - teacher)).sum(-1).mean().item(),
        "upper_mode_frac": (mass_hi > mass_lo).float().mean().item(),
    }


def run_bimodal(arm: Arm, cfg: Bimodal, seed: int) -> dict:
    teacher, modes = bimodal_teacher(cfg, seed)
    student = GaussianHead(cfg, seed)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    # A full-distribution divergence is exact at the one position whatever was sampled: one
    # sample per prompt does; sampled signals (sft, pg) draw cfg.samples.
    n = 1 if arm.estimator in ("forward_kl", "reverse_kl", "jsd") else cfg.samples
    rows = torch.arange(cfg.prompts).repeat_interleave(n)
    mask = torch.ones(len(rows), 1, dtype=torch.bool)
    for _ in range(cfg.steps):
        logits = student()
        if arm.estimator == "sft":  # forward KL from the teacher's samples
            y = torch.multinomial(teacher.exp(), n, replacement=True, generator=gen)
            loss = -logits.log_softmax(-1).gather(1, y).mean()
        else:  # on-policy: the student's samples, each a one-token response
            ids = torch.multinomial(logits.detach().softmax(-1), n, True, generator=gen)
            loss = kd_loss(arm, logits[rows, None], ids.reshape(-1, 1), teacher[rows, None], mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = student()
    out = bimodal_metrics(cfg, logits, teacher, modes)
    if seed == 0:  # two prompts' distributions, for the plot
        out["example"] = {"teacher": teacher[:2].exp().tolist(),
                          "student": logits[:2].softmax(-1).tolist()}  # fmt: skip
    return out
