"""Experiment 1: on-policy distillation against supervised training on teacher samples.

Claim under test (GKD, arXiv 2306.13649; Thinking Machines' "On-Policy Distillation" blog): a
student trained on its *own* samples with the teacher's per-token feedback reaches the teacher
in fewer steps than one trained on the teacher's samples, and learns to continue well after its
own mistakes (exposure bias), because it is trained on the states it actually visits.

Tasks (``--task``):

* ``sort_undo`` (default, `sorting.py`): sort 8 digits, where ``<`` takes the previous token
  back, so a student that notices its own mistake can still be right. The teacher (3 layers) is
  trained with prefix noise and recovers from 92% of forced mistakes; it is trained once (seed
  0) and every seed starts from its own warm start (50 SFT steps on teacher samples) of a
  1-layer student (the teacher's first layer): capacity-limited.
* ``adder`` (`kdrl.demo.synthetic`, "07+38=" -> "045"): one teacher per seed; the student keeps
  2 of its 3 layers and starts from the pruned weights (about 8% right), as in ``kdrl demo``.

Arms, all with the same optimizer, learning rate, schedule, prompts and samples per step:

* ``opd_rkl``: kdrl on-policy, full-distribution reverse KL at the student's own prefixes.
* ``opd_pg``: kdrl on-policy, the sampled-token policy-gradient estimator (`pg`, discount 0).
* ``sft``: cross-entropy on fresh teacher samples (SeqKD with sampling), written here.
* ``sup_fkl``: forward KL to the teacher's full distribution at the prefixes of teacher samples
  (kdrl's `forward_kl` loss applied to a teacher-generated batch).

Recovery (`recovery`): after training, one wrong answer token is forced into each held-out
answer and the student continues greedily; it counts as teacher-consistent when its
continuation equals the teacher's from the same prefix.

Run: ``python experiments/opd_vs_sft.py [--seeds 3] [--out runs/exp-opd_vs_sft] [--task T]
[--quick]`` (``--quick``: the CI configuration, the adder for 40 steps).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Clock,
    Curve,
    cpu_seconds,
    fmt_mean_std,
    log,
    markdown_table,
    mean_std,
    parse_args,
    plot_curves,
    seed_all,
    write_results,
)
from sorting import SortSettings, answer_accuracy, continuations, forced_mistakes, prepare_sorting

from kdrl.config import Config, config_to_dict, load_config
from kdrl.demo.synthetic import (
    SyntheticPaths,
    prepare_synthetic,
    synthetic_overrides,
)
from kdrl.models import support_size
from kdrl.rollout import HFRollout, sequence_seed
from kdrl.tiny import save_tiny
from kdrl.train import Run, build, loss_settings, score_teacher, train_step
from kdrl.update import UpdateBatch, policy_update

NAME = "opd_vs_sft"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "synthetic.yaml"


@dataclass(frozen=True)
class Settings:
    """One configuration of the whole experiment (the full run or the CI one)."""

    task: str
    """``sort`` or ``sort_undo`` (`sorting.py`), or ``adder`` (`kdrl.demo.synthetic`)."""
    steps: int
    eval_every: int
    keep: tuple[int, ...]
    """Teacher layers the student keeps (the teacher has 3): its capacity."""
    teacher_seed: int | None = None
    """Train one teacher with this seed for every seed (None: one teacher per seed)."""
    warm_steps: int = 50
    """SFT steps on teacher samples that every arm starts from (`warm_start`)."""
    batch_size: int = 64
    n_samples: int = 2
    lr: float = 2e-3
    threshold: float = 0.9
    """Fraction of the teacher's accuracy a run must reach to count as caught up."""

    @property
    def undo(self) -> bool:
        return self.task == "sort_undo"


FULL = {
    "sort_undo": Settings("sort_undo", steps=70, eval_every=5, keep=(0,), teacher_seed=0),
    "adder": Settings("adder", steps=120, eval_every=10, keep=(0, 1), warm_steps=0),
}
QUICK = {
    "adder": Settings("adder", steps=40, eval_every=10, keep=(0, 1), warm_steps=0),
}

ARMS: dict[str, tuple[str, list[str]]] = {
    # name: (whose samples the student learns from, kdrl overrides)
    "opd_rkl": ("student", ["teacher.kd_estimator=reverse_kl"]),
    "opd_pg": ("student", ["teacher.kd_estimator=pg", "teacher.kd_discount=0.0"]),
    "sft": ("teacher", ["teacher.kd_estimator=pg"]),  # the estimator is unused: CE below
    "sup_fkl": ("teacher", ["teacher.kd_estimator=forward_kl"]),
}


def prepare(s: Settings, out: Path, seed: int) -> SyntheticPaths:
    """The teacher, the pruned student and the prompt files of ``seed``."""
    if s.teacher_seed is not None:
        seed = s.teacher_seed
    folder = out / "prep" / f"{s.task}-seed{seed}"
    if s.task.startswith("sort"):
        return prepare_sorting(folder, SortSettings(seed=seed, keep=s.keep, undo=s.undo))
    return prepare_synthetic(folder, seed=seed, keep=s.keep)


def forced_adder_mistakes(eval_rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Answer digit 0 (the carry) or 1 (tens) replaced by its neighbour (0<->1, 2<->3, ...), the
    kind of slip a student makes; the true remaining digits count as the right continuation."""
    return [
        (r["prompt"] + r["answer"][:k] + str(int(r["answer"][k]) ^ 1), r["answer"][k + 1 :])
        for r in eval_rows for k in (0, 1)
    ]  # fmt: skip


def arm_config(
    arm: str, s: Settings, prep: SyntheticPaths, folder: Path, seed: int, steps: int
) -> Config:
    common = [
        f"seed={seed}", f"train.max_steps={steps}", f"train.batch_size={s.batch_size}",
        f"rollout.n_samples={s.n_samples}", f"optim.lr={s.lr}", "train.threads=1",
        "eval.every_steps=0", "teacher.rl_loss_weight=0.0", "teacher.distill_loss_weight=1.0",
        "data.max_prompt_tokens=32",
    ]  # fmt: skip
    if s.undo:  # room for two take-backs (two tokens each)
        common.append(f"rollout.max_new_tokens={prep.digits + 2 + 4}")
    return load_config(EXAMPLE, [*synthetic_overrides(prep, folder), *common, *ARMS[arm][1]])


# --- the supervised arms: the student learns from the teacher's samples --------------------


def sft_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the student on the response tokens (EOS included) of ``batch``."""
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp_BT = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids_BT[:, 1:, None])[..., 0]
    mask_BT = batch.response_mask_BT[:, 1:]
    return -(logp_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def teacher_sample_step(run: Run, teacher_rollout: HFRollout, arm: str) -> None:
    """One step of ``sft`` or ``sup_fkl``: the same prompts, sample count, optimizer and schedule
    as an on-policy step, but the sequences come from the teacher."""
    cfg = run.cfg
    indices = run.sampler.next_batch()
    assert indices is not None, "the sampler ran out of prompts"
    prompts = [run.prompts[i] for i in indices]
    batch = teacher_rollout.generate(
        prompts, n_samples=cfg.rollout.n_samples, seed=sequence_seed(cfg.seed, run.step, -1)
    )
    if arm == "sup_fkl":  # kdrl's forward-KL loss, at the teacher's prefixes instead
        teacher_out = score_teacher(run, batch)
        zeros = torch.zeros(batch.num_sequences)
        policy_update(
            run.student, run.optimizer, run.scheduler,
            UpdateBatch(batch, teacher_out, zeros, torch.ones_like(zeros)),
            loss_settings(cfg, run.step, support_size(run.model, run.tokenizer)),
            n_minibatches=1, max_tokens_per_mb=cfg.train.mb_spec.max_tokens_per_mb,
            max_grad_norm=cfg.optim.max_grad_norm,
        )  # fmt: skip
    else:
        run.model.train()
        sft_loss(run.model, batch).backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.step += 1


# --- recovery after an early mistake ---------------------------------------------------------


def recovery(student, teacher, tokenizer, forced: list[tuple[str, str]]) -> dict[str, float]:
    """Each ``(prefix, truth)`` pair is a prompt followed by the start of its answer with one
    wrong token at the end (the forced mistake); each model continues it greedily.

    ``consistent``: the student's continuation equals the teacher's from the same prefix (what
    distillation asks of the student, at a state off the teacher's own path); ``correct``: it
    equals ``truth``, the task's right way to go on (see the task's ``forced_mistakes``);
    ``teacher_correct``: the same for the teacher."""
    prefixes, truth = [p for p, _ in forced], [t for _, t in forced]
    n_new = max(len(t) for t in truth) + 2  # room for one token too many, then EOS
    s = continuations(student, tokenizer, prefixes, n_new)
    t = continuations(teacher, tokenizer, prefixes, n_new)
    n = len(forced)
    return {
        "consistent": sum(a == b for a, b in zip(s, t, strict=True)) / n,
        "correct": sum(a == b for a, b in zip(s, truth, strict=True)) / n,
        "teacher_correct": sum(a == b for a, b in zip(t, truth, strict=True)) / n,
    }


@torch.no_grad()
def next_tokens(model, tokenizer, prefixes: list[str]) -> list[int]:
    """The greedy next token after each prefix."""
    out: dict[int, int] = {}
    by_length: dict[int, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        by_length.setdefault(len(prefix), []).append(i)
    for rows in by_length.values():
        ids = tokenizer([prefixes[i] for i in rows], add_special_tokens=False)["input_ids"]
        picked = model(input_ids=torch.tensor(ids)).logits[:, -1].argmax(-1).tolist()
        out.update(zip(rows, picked, strict=True))
    return [out[i] for i in range(len(prefixes))]


def own_mistakes(run: Run, max_new_tokens: int) -> dict[str, float]:
    """Recovery where the student actually errs: it answers each held-out prompt twice at
    temperature 1, and at the first token where an answer leaves the right one, the student's
    greedy next token is compared with the teacher's (``agree``); ``states`` is how many such
    first mistakes the samples had."""
    rollout = HFRollout(run.model, run.tokenizer, temperature=1.0, top_p=1.0,
                        max_new_tokens=max_new_tokens)  # fmt: skip
    with torch.random.fork_rng():
        batch = rollout.generate(run.eval_prompts, n_samples=2, seed=12345)
    by_index = {p.index: p for p in run.eval_prompts}
    prefixes = []
    for text, index in zip(batch.response_texts, batch.prompt_index_B, strict=True):
        prompt = by_index[index]
        pairs = enumerate(zip(text, prompt.answer, strict=False))  # lengths may differ
        k = next((j for j, (a, b) in pairs if a != b), None)
        if k is not None:
            prefixes.append(prompt.text + text[: k + 1])
    if not prefixes:
        return {"agree": float("nan"), "states": 0}
    s = next_tokens(run.model, run.tokenizer, prefixes)
    t = next_tokens(run.teacher_model, run.tokenizer, prefixes)
    return {"agree": sum(a == b for a, b in zip(s, t, strict=True)) / len(s),
            "states": len(s)}  # fmt: skip


# --- one (arm, seed) run ---------------------------------------------------------------------


def make_run(arm: str, s: Settings, prep: SyntheticPaths, folder: Path, seed: int, steps: int):
    """(kdrl Run, one training step of ``arm``) for ``steps`` steps from ``prep.student``."""
    cfg = arm_config(arm, s, prep, folder, seed, steps)
    seed_all(seed)
    run = build(cfg, folder, None)
    if ARMS[arm][0] == "student":
        return run, lambda: train_step(run)
    teacher_rollout = HFRollout(
        run.teacher_model, run.tokenizer, temperature=cfg.teacher.temperature, top_p=1.0,
        max_new_tokens=cfg.rollout.max_new_tokens,
    )  # fmt: skip
    return run, lambda: teacher_sample_step(run, teacher_rollout, arm)


def warm_start(s: Settings, prep: SyntheticPaths, out: Path, seed: int) -> SyntheticPaths:
    """``prep`` with its student replaced by one trained ``s.warm_steps`` SFT steps on teacher
    samples: the common starting point of every arm (on-policy distillation from a student that
    is almost never right learns from noise; TML and GKD start from a fine-tuned student)."""
    if s.warm_steps == 0:
        return prep
    folder = out / "runs" / f"warm-seed{seed}"
    run, step = make_run("sft", s, prep, folder, seed, s.warm_steps)
    while run.step < s.warm_steps:
        step()
    save_tiny(folder / "student", run.tokenizer, run.model)
    rows = [json.loads(line) for line in prep.eval_file.read_text().splitlines()]
    acc = answer_accuracy(run.model, run.tokenizer, rows, undo=s.undo)
    return replace(prep, student=folder / "student", student_accuracy=acc)


def run_arm(arm: str, seed: int, s: Settings, prep: SyntheticPaths, out: Path) -> dict:
    folder = out / "runs" / f"{arm}-seed{seed}"
    run, step = make_run(arm, s, prep, folder, seed, s.steps)
    cfg = run.cfg
    eval_rows = [json.loads(line) for line in prep.eval_file.read_text().splitlines()]
    forced = (
        forced_mistakes(eval_rows, undo=s.undo)
        if s.task.startswith("sort")
        else forced_adder_mistakes(eval_rows)
    )
    undo = s.undo
    clock, curve = Clock(), Curve()
    curve.add(0, answer_accuracy(run.model, run.tokenizer, eval_rows, undo=undo), clock)
    while run.step < s.steps:
        with clock:
            step()
        if run.step % s.eval_every == 0 or run.step == s.steps:
            curve.add(run.step, answer_accuracy(run.model, run.tokenizer, eval_rows, undo=undo),
                      clock)  # fmt: skip
    return {
        "arm": arm, "seed": seed, "curve": curve.to_dict(),
        "recovery": recovery(run.model, run.teacher_model, run.tokenizer, forced),
        "own_mistakes": own_mistakes(run, cfg.rollout.max_new_tokens),
        "train_cpu_s": round(clock.cpu, 2), "train_wall_s": round(clock.wall, 2),
        "config": config_to_dict(cfg),
    }  # fmt: skip


# --- summary ---------------------------------------------------------------------------------


def summarise(results: list[dict], teachers: dict[int, dict], s: Settings) -> dict[str, dict]:
    summary = {}
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        reach = {by: [] for by in ("x", "cpu", "wall")}
        for r in rs:
            curve = Curve(**r["curve"])
            target = s.threshold * teachers[r["seed"]]["accuracy"]
            for by in reach:
                reach[by].append(curve.first_reaching(target, by=by))
        summary[arm] = {
            "steps_to_threshold": reach["x"], "cpu_s_to_threshold": reach["cpu"],
            "wall_s_to_threshold": reach["wall"],
            "final_accuracy": [r["curve"]["y"][-1] for r in rs],
            "auc": [Curve(**r["curve"]).area() for r in rs],
            "cpu_s_per_step": [r["train_cpu_s"] / s.steps for r in rs],
            "consistent": [r["recovery"]["consistent"] for r in rs],
            "correct": [r["recovery"]["correct"] for r in rs],
            "own_agree": [r["own_mistakes"]["agree"] for r in rs],
            "own_states": [r["own_mistakes"]["states"] for r in rs],
        }  # fmt: skip
    return summary


def results_table(summary: dict[str, dict], teachers: dict[int, dict], s: Settings) -> str:
    headers = [
        "arm", f"steps to {s.threshold:.0%} of teacher", "CPU s to it", "wall s to it",
        "final acc %", "AUC %", "CPU ms/step", "forced mistake: teacher-consistent %",
        "forced mistake: correct %", "own mistakes: agrees with teacher % (states)",
    ]  # fmt: skip
    rows = []
    for arm, m in summary.items():
        rows.append([
            arm, fmt_mean_std(m["steps_to_threshold"], digits=0),
            fmt_mean_std(m["cpu_s_to_threshold"], digits=1),
            fmt_mean_std(m["wall_s_to_threshold"], digits=1),
            fmt_mean_std(m["final_accuracy"], digits=1, scale=100),
            fmt_mean_std(m["auc"], digits=1, scale=100),
            fmt_mean_std(m["cpu_s_per_step"], digits=0, scale=1000),
            fmt_mean_std(m["consistent"], digits=1, scale=100),
            fmt_mean_std(m["correct"], digits=1, scale=100),
            f"{fmt_mean_std(m['own_agree'], digits=1, scale=100)} "
            f"({mean_std(m['own_states'])[0]:.0f})",
        ])  # fmt: skip
    t_acc = [t["accuracy"] for t in teachers.values()]
    t_rec = [t["recovery_correct"] for t in teachers.values()]
    rows.append(["teacher", "", "", "", fmt_mean_std(t_acc, digits=1, scale=100), "", "", "",
                 fmt_mean_std(t_rec, digits=1, scale=100), ""])  # fmt: skip
    return markdown_table(headers, rows)


def plot(results: list[dict], summary: dict, teachers: dict, s: Settings, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {arm: [Curve(**r["curve"]) for r in results if r["arm"] == arm] for arm in ARMS}
    teacher = mean_std(t["accuracy"] for t in teachers.values())[0]
    lines = {"teacher": teacher, f"{s.threshold:.0%} of teacher": s.threshold * teacher}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80, sharey=True)
    plot_curves(out, curves, xlabel="training step", ylabel="greedy exact match (held out)",
                title="accuracy per step", hlines=lines, ax=axes[0])  # fmt: skip
    plot_curves(out, curves, xlabel="training CPU seconds (one core)", ylabel="",
                title="accuracy per CPU second (seeds shown separately)", hlines=lines,
                by="cpu", ax=axes[1])  # fmt: skip
    fig.tight_layout()
    curves_png = out / f"{NAME}_{s.task}_curves.png"
    fig.savefig(curves_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.2, 3.4), dpi=80)
    width, arms = 0.27, list(summary)
    bars = (("consistent", "forced mistake: continues as the teacher does"),
            ("correct", "forced mistake: continues correctly"),
            ("own_agree", "own mistakes: next token = teacher's"))  # fmt: skip
    for j, (key, label) in enumerate(bars):
        means = [100 * mean_std(summary[a][key])[0] for a in arms]
        stds = [100 * mean_std(summary[a][key])[1] for a in arms]
        xs = [i + (j - 1) * width for i in range(len(arms))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    t_rec = 100 * mean_std(t["recovery_correct"] for t in teachers.values())[0]
    ax.axhline(t_rec, color="black", linestyle="--", linewidth=1,
               label="teacher: forced mistake, continues correctly")  # fmt: skip
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title(f"{s.task}: after one wrong answer token", fontsize=10)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    recovery_png = out / f"{NAME}_{s.task}_recovery.png"
    fig.savefig(recovery_png, bbox_inches="tight")
    plt.close(fig)
    return [curves_png, recovery_png]


def main(argv: list[str] | None = None) -> dict:
    def task_option(parser) -> None:
        parser.add_argument("--task", choices=list(FULL), default=None,
                            help="sort_undo (the default) or adder (the default with --quick, "
                            "the only task it has)")  # fmt: skip

    args = parse_args(NAME, __doc__.splitlines()[0], argv, task_option)
    table = QUICK if args.quick else FULL
    task = args.task or next(iter(table))
    if task not in table:
        raise SystemExit(f"--quick has no {task} configuration; it runs {', '.join(table)}")
    s = table[task]
    out: Path = args.out
    start = time.perf_counter(), cpu_seconds()
    results, teachers = [], {}
    for seed in range(args.seeds):
        seed_all(seed)
        prep = warm_start(s, prepare(s, out, seed), out, seed)
        log(f"seed {seed}: teacher {prep.teacher_accuracy:.1%}, student {prep.student_accuracy:.1%}"
            f" at start ({time.perf_counter() - start[0]:.0f} s)")  # fmt: skip
        teachers[seed] = {"accuracy": prep.teacher_accuracy}
        for arm in ARMS:
            r = run_arm(arm, seed, s, prep, out)
            teachers[seed]["recovery_correct"] = r["recovery"]["teacher_correct"]
            results.append(r)
            elapsed = time.perf_counter() - start[0]
            log(f"  {arm:8s} seed {seed}: accuracy {r['curve']['y'][-1]:.1%}, "
                f"{r['train_cpu_s']:.1f} CPU s ({elapsed:.0f} s)")  # fmt: skip
    summary = summarise(results, teachers, s)
    pngs = plot(results, summary, teachers, s, out)
    data = {"experiment": NAME, "settings": asdict(s), "seeds": args.seeds, "teachers": teachers,
            "summary": summary, "runs": results}  # fmt: skip
    return write_results(out, data, results_table(summary, teachers, s), pngs, start)


if __name__ == "__main__":
    main()
