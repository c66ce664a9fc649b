"""Experiment 3b (see divergences.py): a teacher that is a mixture of K strings per prompt.

``3b-fact``: a factorised student (no position sees the others), trained here with kdrl's loss
functions. ``3b-ar``: a tiny autoregressive Hugging Face Llama trained by kdrl's own loop
(`kdrl.train.build` + `train_step`) with :class:`MixtureTeacher` in place of the loaded teacher.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from divergences_bimodal import Arm, kd_loss
from torch import Tensor, nn

from kdrl.teacher import TeacherOutput

# ---------------------------------------------------------------- 3b: a mixture of strings


@dataclass
class Strings:
    """Settings of parts 3b-fact and 3b-ar: the teacher, and the factorised student's training."""

    prompts: int = 16
    modes: int = 8  # K strings per prompt
    length: int = 6  # L tokens per string
    letters: int = 8  # the alphabet; at each position the K strings use distinct letters
    eps: float = 0.01  # per-token noise of the teacher
    steps: int = 500
    lr: float = 0.05
    samples: int = 16  # per prompt and step
    eval_samples: int = 256  # per prompt, for precision and recall


def string_modes(cfg: Strings, seed: int) -> Tensor:
    """``[P, K, L]`` letter indices: at each position a random assignment of distinct letters to
    the K strings, so any two strings of a prompt differ at every position."""
    g = torch.Generator().manual_seed(20_000 + seed)
    pos = [[torch.randperm(cfg.letters, generator=g)[: cfg.modes] for _ in range(cfg.length)]
           for _ in range(cfg.prompts)]  # fmt: skip
    return torch.stack([torch.stack(p, -1) for p in pos])


class MixtureTeacher:
    """``p(x) = 1/K sum_k prod_t [(1 - eps) 1[x_t = s_kt] + eps / V]`` over ``V`` ids, with exact
    prefix-conditionals ``p(x_t | x_<t)`` through the posterior over the K strings. Implements
    kdrl's `Teacher` protocol (``score``) for a batch of the training loop, whose prompts it
    recognises by their token ids (``prompt_rows``)."""

    def __init__(self, modes_PKL: Tensor, vocab: int, eps: float, prompt_rows=None) -> None:
        self.modes, self.vocab, self.prompt_rows = modes_PKL, vocab, prompt_rows or {}
        self.hit, self.miss = math.log(1 - eps + eps / vocab), math.log(eps / vocab)
        self.eps = eps

    def conditionals(self, prompt_B: Tensor, x_BJ: Tensor) -> Tensor:
        """``log p(. | prompt, x_<j)`` for each position ``j`` of ``x_BJ``: ``[B, J, V]``."""
        s_BKJ = self.modes[prompt_B][..., : x_BJ.shape[1]]
        ll_BKJ = torch.where(s_BKJ == x_BJ[:, None], self.hit, self.miss)
        logw_BKJ = (ll_BKJ.cumsum(-1) - ll_BKJ).log_softmax(1)  # posterior given the prefix
        comp_BKJV = torch.full((*s_BKJ.shape, self.vocab), self.miss)
        comp_BKJV.scatter_(-1, s_BKJ[..., None], self.hit)
        return (logw_BKJ[..., None] + comp_BKJV).logsumexp(1)

    def sample(self, prompt_B: Tensor, gen: torch.Generator) -> Tensor:
        b, length = len(prompt_B), self.modes.shape[-1]
        x_BL = self.modes[prompt_B, torch.randint(self.modes.shape[1], (b,), generator=gen)]
        noise = torch.rand(b, length, generator=gen) < self.eps
        return torch.where(noise, torch.randint(self.vocab, (b, length), generator=gen), x_BL)

    def score(self, batch, *, top_k: int = 0, candidate_ids_BTC=None) -> TeacherOutput:
        if candidate_ids_BTC is not None:
            raise ValueError("MixtureTeacher does not score candidate ids")
        ids_BT, resp_BT = batch.input_ids_BT, batch.response_mask_BT
        (b, t), length = ids_BT.shape, self.modes.shape[-1]
        start_B = resp_BT.float().argmax(1)
        prompt_B = torch.tensor([self.prompt_rows[tuple(ids_BT[i, : start_B[i]].tolist())]
                                 for i in range(b)])  # fmt: skip
        pos_BJ = (start_B[:, None] + torch.arange(length)).clamp(max=t - 1)
        cond_BJV = self.conditionals(prompt_B, ids_BT.gather(1, pos_BJ))
        full_BTV = torch.zeros(b, t, self.vocab)
        for i in range(b):
            n = min(length, t - int(start_B[i]))
            full_BTV[i, start_B[i] : start_B[i] + n] = cond_BJV[i, :n]
        full_BTV.masked_fill_(~resp_BT[..., None], 0.0)
        logp_BT = full_BTV.gather(-1, ids_BT[..., None]).squeeze(-1)
        if not top_k:
            return TeacherOutput(logp_BT)
        return TeacherOutput(logp_BT, full_BTV, torch.arange(self.vocab).expand(b, t, self.vocab))


def string_metrics(x_NJ: Tensor, prompt_N: Tensor, modes_PKJ: Tensor, prompts: int) -> dict:
    """Precision: share of samples within Hamming distance 1 of one of their prompt's strings.
    Recall: strings hit per prompt / K. Mode entropy: entropy of the hit strings' frequencies
    / log K (1: all strings equally often, 0: one string). Mixed: share of samples made only of
    the strings' tokens (each token is some string's token at its position) that are still
    near none of them: pieces of different strings spliced together."""
    k = modes_PKJ.shape[1]
    modes_NKJ = modes_PKJ[prompt_N]
    dist_NK = (x_NJ[:, None] != modes_NKJ).sum(-1)
    d_N, near_N = dist_NK.min(1)
    hit_N = d_N <= 1
    from_some_N = (x_NJ[:, None] == modes_NKJ).any(1).all(-1)
    recall, entropy = [], []
    for p in range(prompts):
        counts = torch.bincount(near_N[hit_N & (prompt_N == p)], minlength=k).float()
        recall.append((counts > 0).float().mean().item())
        if counts.sum() > 0:
            f = counts[counts > 0] / counts.sum()
            entropy.append(float(-(f * f.log()).sum() / math.log(k)))
    return {
        "precision": hit_N.float().mean().item(),
        "recall": sum(recall) / len(recall),
        "mixed": (from_some_N & ~hit_N).float().mean().item(),
        "mode_entropy": sum(entropy) / len(entropy) if entropy else float("nan"),
    }


ARMS_FACT = [
    Arm("sft", "sft"),
    Arm("forward_kl", "forward_kl"),
    Arm("jsd_0.5", "jsd", beta=0.5),
    Arm("reverse_kl", "reverse_kl"),
    *[Arm(f"pg_discount_{g:g}", "pg", discount=g) for g in (0.0, 0.5, 0.9, 1.0)],
]


def run_factorised(arm: Arm, cfg: Strings, seed: int) -> dict:
    """A student whose answer tokens are independent given the prompt: a table of logits
    ``[P, L, letters]``; the teacher's noise is over the letters too."""
    modes = string_modes(cfg, seed)
    teacher = MixtureTeacher(modes, cfg.letters, cfg.eps)
    torch.manual_seed(seed)
    logits = nn.Parameter(0.1 * torch.randn(cfg.prompts, cfg.length, cfg.letters))
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(cfg.prompts).repeat_interleave(cfg.samples)
    mask = torch.ones(len(rows), cfg.length, dtype=torch.bool)

    def sample(rows_B: Tensor) -> Tensor:
        probs = logits.detach()[rows_B].softmax(-1).reshape(-1, cfg.letters)
        return torch.multinomial(probs, 1, generator=gen).reshape(len(rows_B), cfg.length)

    for _ in range(cfg.steps):
        if arm.estimator == "sft":
            y = teacher.sample(rows, gen)
            loss = -logits[rows].log_softmax(-1).gather(-1, y[..., None]).mean()
        else:
            x = sample(rows)
            loss = kd_loss(arm, logits[rows], x, teacher.conditionals(rows, x), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ev = torch.arange(cfg.prompts).repeat_interleave(cfg.eval_samples)
        x, y = sample(ev), teacher.sample(ev, gen)
        logq = logits[ev].log_softmax(-1)
        lq_x, lq_y = (logq.gather(-1, z[..., None]).squeeze(-1).sum(-1) for z in (x, y))
        lp_x, lp_y = (teacher.conditionals(ev, z).gather(-1, z[..., None]).squeeze(-1).sum(-1)
                      for z in (x, y))  # fmt: skip
        q = logits.softmax(-1)
        out = string_metrics(x, ev, modes, cfg.prompts)
        out["reverse_kl"] = (lq_x - lp_x).mean().item()
        out["forward_kl"] = (lp_y - lq_y).mean().item()
        out["marginal_entropy"] = (-(q * q.log()).sum(-1) / math.log(cfg.letters)).mean().item()
    return out


# ---------------------------------------------------------------- 3b-ar: kdrl's training loop


@dataclass
class Autoregressive:
    """Settings of part 3b-ar: a tiny Hugging Face Llama trained by `kdrl.train.train_step`."""

    hidden: int = 16
    layers: int = 1
    heads: int = 2
    warm_steps: int = 1000  # SFT on teacher samples before every arm (the same start for all)
    warm_lr: float = 0.01
    steps: int = 200
    lr: float = 0.003  # lower than warm_lr: at 0.01 `pg` locked onto wrong strings (pilot)
    samples: int = 8  # rollout.n_samples; train.batch_size is every prompt


ARMS_AR = [
    Arm("warm_start", "none"),  # the common starting point, not trained further
    Arm("sft", "sft"),
    Arm("forward_kl", "forward_kl"),
    Arm("reverse_kl", "reverse_kl"),
    Arm("pg_discount_0", "pg", discount=0.0),
    Arm("pg_discount_1", "pg", discount=1.0),
]
LETTERS = "abcdefgh"


def ar_config(
    arm: Arm, cfg: Autoregressive, strings: Strings, folder: Path, seed: int,
    student: str = "warm", steps: int | None = None, lr: float | None = None,
):  # fmt: skip
    """The kdrl config of one arm (also recorded in the results). The teacher path is a
    placeholder: `run_autoregressive` replaces the loaded teacher with the mixture teacher."""
    from kdrl.config import load_config

    # sft and warm_start do not use kdrl's loss: any valid estimator name will do
    estimator = "reverse_kl" if arm.estimator in ("sft", "none") else arm.estimator
    steps = cfg.steps if steps is None else steps
    lr = cfg.lr if lr is None else lr
    return load_config(None, [
        f"seed={seed}", f"student.path={folder / student}", f"teacher.path={folder / student}",
        "teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1",
        f"teacher.kd_estimator={estimator}", f"teacher.kd_discount={arm.discount}",
        f"teacher.jsd_beta={arm.beta}", f"data.path={folder / 'prompts.jsonl'}",
        "data.chat_template=false", "data.max_prompt_tokens=8",
        f"rollout.n_samples={cfg.samples}", f"rollout.max_new_tokens={strings.length + 1}",
        f"optim.lr={lr}", "optim.max_grad_norm=1.0", f"train.batch_size={strings.prompts}",
        "train.epochs=1000000", f"train.max_steps={max(steps, 1)}", "train.threads=1",
        "train.device=cpu", "train.tensorboard=false", f"train.output_dir={folder / arm.name}",
    ])  # fmt: skip


def prepare_autoregressive(cfg: Autoregressive, strings: Strings, folder: Path, seed: int):
    """Writes the seed's prompts and student (a random tiny Llama, then ``warm_steps`` of SFT,
    saved in ``warm/``); returns the teacher, whose strings are token ids ending with EOS."""
    from kdrl.models import support_size
    from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm
    from kdrl.train import build

    tok = char_tokenizer(LETTERS + "0123456789:")
    model = tiny_causal_lm(tok, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, seed=seed)
    save_tiny(folder / "student", tok, model)
    rows = [json.dumps({"prompt": f"{i:02d}:"}) + "\n" for i in range(strings.prompts)]
    (folder / "prompts.jsonl").write_text("".join(rows))
    letter_ids = torch.tensor(tok.convert_tokens_to_ids(list(LETTERS)))
    modes = letter_ids[string_modes(strings, seed)]
    eos = torch.full((*modes.shape[:2], 1), tok.eos_token_id)
    modes = torch.cat([modes, eos], -1)
    kcfg = ar_config(ARMS_AR[0], cfg, strings, folder, seed, "student", cfg.warm_steps, cfg.warm_lr)
    run = build(kcfg, folder / "warm-run", None)
    rows = {tuple(p.ids): p.index for p in run.prompts}
    teacher = MixtureTeacher(modes, support_size(run.model, run.tokenizer), strings.eps, rows)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.warm_steps):
        sft_step(run, teacher, gen)
    save_tiny(folder / "warm", tok, run.model)
    return teacher


def sft_step(run, teacher: MixtureTeacher, gen: torch.Generator) -> None:
    """Cross-entropy on fresh teacher samples, with the run's optimizer, schedule and clip."""
    n = run.cfg.rollout.n_samples
    rows = torch.arange(len(run.prompts)).repeat_interleave(n)
    prompt_ids = torch.tensor([run.prompts[int(r)].ids for r in rows])  # equal lengths here
    ids = torch.cat([prompt_ids, teacher.sample(rows, gen)], 1)
    labels = ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    loss = run.student(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.student.parameters(), run.cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def run_autoregressive(arm: Arm, cfg: Autoregressive, strings: Strings, seed: int, folder: Path,
                       teacher: MixtureTeacher) -> dict:  # fmt: skip
    """One arm from the seed's warm start (`prepare_autoregressive`)."""
    from kdrl.train import build, train_step

    kcfg = ar_config(arm, cfg, strings, folder, seed)
    run = build(kcfg, folder / arm.name, None)
    run.teacher, run.teacher_model = teacher, None  # the seam: kdrl's Teacher protocol
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(0 if arm.estimator == "none" else cfg.steps):
        if arm.estimator == "sft":
            sft_step(run, teacher, gen)
        else:
            train_step(run)
    return ar_metrics(run, teacher, strings, gen) | {"config": config_dict(kcfg)}


@torch.no_grad()
def ar_metrics(run, teacher: MixtureTeacher, strings: Strings, gen: torch.Generator) -> dict:
    n, length = strings.eval_samples, strings.length + 1
    batch = run.rollout.generate(run.prompts, n_samples=n, seed=123_456)
    start = int(batch.response_mask_BT.float().argmax(1).min())
    x = batch.input_ids_BT[:, start : start + length]
    x = torch.where(batch.response_mask_BT[:, start : start + length], x, -1)
    x = torch.nn.functional.pad(x, (0, length - x.shape[1]), value=-1)
    prompt_N = torch.tensor(batch.prompt_index_B)
    out = string_metrics(x, prompt_N, teacher.modes, strings.prompts)
    lp_x = teacher.score(batch).logprobs_BT.sum(1)
    out["reverse_kl"] = (batch.behav_logprobs_BT.sum(1) - lp_x).mean().item()
    y = teacher.sample(prompt_N, gen)
    prompt_ids = torch.tensor([run.prompts[int(p)].ids for p in prompt_N])
    ids = torch.cat([prompt_ids, y], 1)
    logq = run.model(input_ids=ids).logits[:, prompt_ids.shape[1] - 1 : -1].log_softmax(-1)
    lq_y = logq.gather(-1, y[..., None]).squeeze(-1).sum(-1)
    lp_y = teacher.conditionals(prompt_N, y).gather(-1, y[..., None]).squeeze(-1).sum(-1)
    out["forward_kl"] = (lp_y - lq_y).mean().item()
    out["empty_frac"] = (x[:, 0] == run.tokenizer.eos_token_id).float().mean().item()
    out["length"] = batch.response_len_B.float().mean().item()
    return out


def config_dict(cfg) -> dict:
    from kdrl.config import config_to_dict

    return config_to_dict(cfg)
