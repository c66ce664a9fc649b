#!/usr/bin/env python
"""kdrl against TRL at equal settings: time per step and peak memory, on this machine.

    .venv/bin/python bench/vs_trl.py [--rounds 2] [--warmup 1] [--steps 3] [--threads 2] [--gkd]

The demo's model pair (teacher SmolLM2-135M-Instruct, student pruned to 4 of its 30 layers,
both float32, prepared and cached by ``kdrl.demo.smollm``), the demo's training prompts through
the chat template, 8 prompts per step with one sampled answer each, at most 64 new tokens,
temperature 1, AdamW at the same constant learning rate, gradient clipping at 1, no gradient
checkpointing, and on-policy reverse KL:

- ``kdrl-reverse_kl``: kdrl, ``teacher.kd_estimator=reverse_kl`` (full-distribution reverse KL,
  ``teacher.top_k=null``), the same loss as TRL's below;
- ``kdrl-pg``: kdrl's default sampled-token estimator ``pg``: a different, single-sample
  estimator of the same reverse-KL gradient (the teacher is asked for the sampled token's
  log-prob only);
- ``trl-distill``: ``trl.DistillationTrainer`` with ``beta=1`` (generalized JSD at beta 1 is
  reverse KL; the trainer is always on-policy), one completion per prompt (its fixed ``n=1``);
- ``trl-gkd`` (``--gkd``): ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1, beta=1``.

Each configuration runs in a fresh subprocess (so each has its own peak RSS), alternating kdrl
and TRL for ``--rounds`` rounds; each run does ``--warmup`` untimed steps then ``--steps`` timed
ones. The table gives the median time per step over all timed steps of all rounds, peak RSS
(whole process, loading included) and the ratios. Results go to ``bench/results/vs_trl.json``.

TRL is a bench-only dependency: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "examples" / "demo.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "vs_trl.json"
INSTALL_HINT = "pip install -e '.[bench]'  (from the repository root; installs trl==1.16.0)"

KDRL_CONFIGS = {"kdrl-reverse_kl": "reverse_kl", "kdrl-pg": "pg"}
TRL_CONFIGS = ("trl-distill", "trl-gkd")
BASELINE = "trl-distill"
"""The configuration the ratios are taken against."""


# --- memory --------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: ``/proc/self/clear_refs`` = 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process, split at :meth:`mark` (end of set-up).

    Read from ``VmHWM`` (per address space: an exec'd child starts afresh), not ``ru_maxrss``,
    which on Linux can inherit the launching process's peak across fork + exec.
    """

    def __init__(self) -> None:
        self.load_mb: float | None = None
        self.reset = False

    def mark(self) -> None:
        self.load_mb = _status_kb("VmHWM") / 1024
        self.reset = reset_peak_rss()

    def result(self) -> dict[str, float | bool | None]:
        now = _status_kb("VmHWM") / 1024
        load = self.load_mb or 0.0
        return {
            "peak_rss_mb": max(load, now),  # whole process, loading included
            "load_peak_rss_mb": self.load_mb,  # up to the end of set-up
            "train_peak_rss_mb": now if self.reset else None,  # during the steps only
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


# --- shared settings -----------------------------------------------------------------------------


def demo_models() -> tuple[Path, Path]:
    """(teacher folder, student folder): the demo pair, converted and pruned once, cached."""
    from kdrl.demo.run import cache_dir
    from kdrl.demo.smollm import convert_teacher, make_student

    teacher = convert_teacher(cache_dir() / "smollm2-135m-instruct")
    return teacher, make_student(teacher, cache_dir() / "smollm2-135m-pruned-4")


def kdrl_overrides(a: argparse.Namespace, estimator: str, output_dir: str) -> list[str]:
    """The demo config turned into the benchmark's settings (see the module docstring)."""
    return [
        f"teacher.path={a.teacher}",
        f"student.path={a.student}",
        "student.dtype=float32",
        "student.gradient_checkpointing=false",
        "teacher.dtype=float32",
        "teacher.temperature=1.0",
        "teacher.rl_loss_weight=0.0",
        "teacher.distill_loss_weight=1.0",
        f"teacher.kd_estimator={estimator}",
        "teacher.top_k=null",
        "rollout.n_samples=1",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        f"rollout.max_new_tokens={a.max_new_tokens}",
        "reward.fn=none",  # TRL computes no reward either
        "data.shuffle=false",  # both take the prompts in file order: the same prompts per step
        "eval.path=''",
        f"optim.lr={a.lr}",
        "optim.weight_decay=0.0",
        "optim.warmup_steps=0",
        "optim.lr_schedule=constant",
        "optim.max_grad_norm=1.0",
        f"train.batch_size={a.batch_size}",
        f"train.max_steps={a.warmup + a.steps}",
        "train.epochs=1000",
        f"train.threads={a.threads}",
        "train.device=cpu",
        "train.tensorboard=false",
        f"train.output_dir={output_dir}",
        "seed=1",
    ]


def demo_rows(a: argparse.Namespace) -> list[dict]:
    """The demo's training rows with the demo's prompt template applied (``text``), read
    through the same kdrl config the kdrl runs use."""
    from kdrl.config import load_config

    data = load_config(DEMO_CONFIG, kdrl_overrides(a, "pg", "unused")).data
    rows = [json.loads(line) for line in (REPO / data.path).read_text().splitlines() if line]
    for row in rows:
        row["text"] = data.prompt_template.format(**row)
    return rows


def check_prompts(a: argparse.Namespace) -> dict:
    """kdrl and TRL must feed the same token ids: kdrl's rendered prompts against the chat
    template call TRL's ``DistillationTrainer`` makes (``add_generation_prompt=True``)."""
    from transformers import AutoTokenizer

    from kdrl.config import load_config
    from kdrl.data import load_prompts

    cfg = load_config(DEMO_CONFIG, kdrl_overrides(a, "pg", "unused"))
    tokenizer = AutoTokenizer.from_pretrained(a.student)
    kdrl_ids = [p.ids for p in load_prompts(cfg.data, tokenizer).prompts]
    conversations = [[{"role": "user", "content": r["text"]}] for r in demo_rows(a)]
    trl_ids = tokenizer.apply_chat_template(
        conversation=conversations, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    same = [list(x) for x in kdrl_ids] == [list(x) for x in trl_ids]
    lengths = [len(x) for x in kdrl_ids]
    return {"identical": same, "n_prompts": len(lengths), "mean_prompt_tokens": _mean(lengths)}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# --- children: one configuration each -------------------------------------------------------------


def child_kdrl(a: argparse.Namespace, estimator: str) -> dict:
    import torch

    from kdrl.config import load_config
    from kdrl.train import build, train_step

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="kdrl-bench-") as tmp:
        cfg = load_config(DEMO_CONFIG, kdrl_overrides(a, estimator, tmp))
        t0 = time.perf_counter()
        run = build(cfg, Path(tmp), None)
        setup_s = time.perf_counter() - t0
        memory = PeakRSS()
        memory.mark()
        steps = []
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            m = train_step(run)
            wall = time.perf_counter() - t
            if m is None:
                raise RuntimeError(f"kdrl ran out of prompts at step {i}")
            steps.append({
                "step_s": wall,
                "rollout_s": m["time/rollout"],
                "teacher_s": m["time/teacher"],
                "update_s": m["time/update"],
                "reward_s": m["time/reward"],
                "response_tokens": m["rollout/len_mean"] * a.batch_size,
                "loss": m["loss/total"],
                "reverse_kl_1sample": m.get("rollout/reverse_kl"),
            })  # fmt: skip
    return {"setup_s": setup_s, "steps": steps, **memory.result()}


class _StepTimer:
    """TrainerCallback (built lazily: transformers is imported in the child only) timing each
    optimizer step from ``on_step_begin`` to ``on_step_end``; phases are added by wrappers."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.phases = {"rollout_s": 0.0, "teacher_s": 0.0}
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.steps.append({"step_s": time.perf_counter() - timer.t0, **timer.phases})

            def on_log(self, args, state, control, logs=None, **kw):
                timer.logs.append(dict(logs or {}))

        self.callback = Callback()
        self.steps: list[dict] = []
        self.logs: list[dict] = []
        self.phases: dict[str, float] = {}
        self.t0 = 0.0

    def timed(self, phase: str, fn, when=None, tokens=None):
        """``fn`` with its time added to ``phase`` (for calls where ``when(*args)`` holds) and,
        with ``tokens``, ``tokens(result)`` added to the step's response-token count."""

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if when is None or when(*args):
                self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t
            if tokens is not None:
                count = self.phases.get("response_tokens", 0) + tokens(out)
                self.phases["response_tokens"] = count
            return out

        return wrapper

    def result(self) -> list[dict]:
        # One on_log per step (logging_steps=1), after its on_step_end; the last call is the
        # end-of-training summary, which has no "loss".
        step_logs = [log for log in self.logs if "loss" in log]
        for step, log in zip(self.steps, step_logs, strict=False):
            step["update_s"] = step["step_s"] - step["rollout_s"] - step["teacher_s"]
            step["loss"] = log.get("loss")
        return self.steps


def _trl_common(a: argparse.Namespace, tmp: str) -> dict:
    """TrainingArguments both TRL trainers get: the kdrl settings above, spelled for TRL."""
    return dict(
        output_dir=tmp,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is True; kdrl's is False
        use_cpu=True,
        bf16=False,
        fp16=False,
        temperature=1.0,
        seed=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # as kdrl: every step has the full batch of prompts
        dataloader_pin_memory=False,
    )


def child_trl(a: argparse.Namespace, kind: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    datasets.disable_progress_bars()
    rows = demo_rows(a)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(a.student, padding_side="left")
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
        timer = _StepTimer()
        if kind == "trl-distill":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(
                **_trl_common(a, tmp), beta=1.0, max_completion_length=a.max_new_tokens,
                top_p=1.0, top_k=0, shuffle_dataset=False,
            )  # fmt: skip
            dataset = datasets.Dataset.from_list(
                [{"prompt": [{"role": "user", "content": r["text"]}]} for r in rows]
            )
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                processing_class=tokenizer, callbacks=[timer.callback],
            )  # fmt: skip
            # Instance attributes shadow the methods: generation, and the teacher's backbone
            # forward (its lm_head projection happens inside the chunked loss, counted as update).
            teacher_module = trainer.accelerator.unwrap_model(trainer.teacher_model)
            trainer._generate = timer.timed(
                "rollout_s", trainer._generate, tokens=lambda out: sum(len(c) for c in out[1])
            )
            trainer._get_last_hidden_state = timer.timed(
                "teacher_s", trainer._get_last_hidden_state,
                when=lambda model, *rest: model is teacher_module,
            )  # fmt: skip
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(
                **_trl_common(a, tmp), beta=1.0, lmbda=1.0, seq_kd=False,
                max_new_tokens=a.max_new_tokens, train_sampling_strategy="sequential",
            )  # fmt: skip
            # GKD's collator takes the prompt from the conversation minus its last message.
            dataset = datasets.Dataset.from_list([
                {"messages": [{"role": "user", "content": r["text"]},
                              {"role": "assistant", "content": r["answer"]}]}
                for r in rows
            ])  # fmt: skip
            trainer = GKDTrainer(
                model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                processing_class=tokenizer, callbacks=[timer.callback],
            )  # fmt: skip
            trainer.generate_on_policy_outputs = timer.timed(
                "rollout_s", trainer.generate_on_policy_outputs,
                tokens=lambda out: int((out[2] != -100).sum()),
            )  # fmt: skip
            teacher_module = trainer.accelerator.unwrap_model(trainer.teacher_model)
            teacher_module.forward = timer.timed("teacher_s", teacher_module.forward)
        setup_s = time.perf_counter() - t0
        memory = PeakRSS()
        memory.mark()
        trainer.train()
        mem = memory.result()
    steps = timer.result()
    if len(steps) != a.warmup + a.steps:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {a.warmup + a.steps}")
    return {"setup_s": setup_s, "steps": steps, **mem}


def child_prepare(a: argparse.Namespace) -> dict:
    a.teacher, a.student = demo_models()
    return {"teacher": str(a.teacher), "student": str(a.student), "prompts": check_prompts(a)}


def child_main(a: argparse.Namespace) -> None:
    if a.child == "prepare":
        result = child_prepare(a)
    elif a.child in KDRL_CONFIGS:
        result = child_kdrl(a, KDRL_CONFIGS[a.child])
    else:
        result = child_trl(a, a.child)
    Path(a.child_out).write_text(json.dumps(result))


# --- parent: alternate, aggregate, print ----------------------------------------------------------


def run_child(a: argparse.Namespace, name: str, log_dir: Path) -> dict:
    out = log_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out),
        "--threads", str(a.threads), "--warmup", str(a.warmup), "--steps", str(a.steps),
        "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
        "--lr", str(a.lr),
    ]  # fmt: skip
    if a.teacher:
        cmd += ["--teacher", str(a.teacher), "--student", str(a.student)]
    n = str(a.threads)
    env = os.environ | {
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
    }  # fmt: skip
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout
            )
            failure = f"exit {proc.returncode}" if proc.returncode or not out.is_file() else None
        except subprocess.TimeoutExpired:
            failure = f"timed out after {a.timeout:.0f} s (--timeout)"
    if failure:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{name} failed ({failure}); its last output lines:\n{tail}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def summarise(name: str, runs: list[dict], warmup: int) -> dict:
    timed = [s for r in runs for s in r["steps"][warmup:]]

    def med(key):
        values = [s[key] for s in timed if s.get(key) is not None]
        return statistics.median(values) if values else None

    steps = [s["step_s"] for s in timed]
    tokens = [s["response_tokens"] for s in timed if s.get("response_tokens") is not None]
    return {
        "median_step_s": statistics.median(steps),
        "min_step_s": min(steps),
        "max_step_s": max(steps),
        "median_rollout_s": med("rollout_s"),
        "median_teacher_s": med("teacher_s"),
        "median_update_s": med("update_s"),
        "mean_response_tokens_per_step": _mean(tokens) if tokens else None,
        "per_round_median_step_s": [
            statistics.median(s["step_s"] for s in r["steps"][warmup:]) for r in runs
        ],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "train_peak_rss_mb": (
            max(r["train_peak_rss_mb"] for r in runs)
            if all(r["train_peak_rss_mb"] is not None for r in runs)
            else None
        ),
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(summary: dict[str, dict]) -> str:
    base = summary.get(BASELINE)
    head = (
        "configuration    | median s/step | rollout | teacher | update | resp tok/step "
        "| peak RSS MB | train-phase peak MB | TRL/this time | this/TRL peak RSS"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        speed = mem = None
        if base is not None:
            speed = base["median_step_s"] / s["median_step_s"]
            mem = s["peak_rss_mb"] / base["peak_rss_mb"]
        lines.append(
            f"{name:<16} | {s['median_step_s']:13.2f} | {_fmt(s['median_rollout_s'], '7.2f')} "
            f"| {_fmt(s['median_teacher_s'], '7.2f')} | {_fmt(s['median_update_s'], '6.2f')} "
            f"| {_fmt(s['mean_response_tokens_per_step'], '13.0f')} "
            f"| {s['peak_rss_mb']:11.0f} | {_fmt(s['train_peak_rss_mb'], '19.0f')} "
            f"| {_fmt(speed, '12.2f')}x | {_fmt(mem, '16.2f')}x"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--gkd", action="store_true", help="also run TRL's experimental GKDTrainer")
    p.add_argument("--only", default="", help="comma-separated configurations to run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON")
    # Internal: one configuration in this process.
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--student", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        child_main(a)
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(f"bench/vs_trl.py needs TRL, a bench-only dependency: {INSTALL_HINT}")
    if a.rounds < 1 or a.steps < 1 or a.warmup < 0:
        raise SystemExit("--rounds and --steps must be >= 1, --warmup >= 0")
    configs = ["kdrl-reverse_kl", "trl-distill", "kdrl-pg"] + (["trl-gkd"] if a.gkd else [])
    if a.only:
        wanted = [c.strip() for c in a.only.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(KDRL_CONFIGS) - set(TRL_CONFIGS))
        if unknown:
            known = ", ".join([*KDRL_CONFIGS, *TRL_CONFIGS])
            raise SystemExit(f"unknown configuration(s) {unknown}; known: {known}")
        configs = [c for c in [*configs, "trl-gkd"] if c in wanted]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        # Everything that imports torch runs in children: the parent stays small.
        prepared = run_child(a, "prepare", Path(tmp))
        a.teacher, a.student = prepared["teacher"], prepared["student"]
        prompts = prepared["prompts"]
        if not prompts["identical"]:
            raise SystemExit("kdrl and TRL would tokenize the demo prompts differently")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        load_before = os.getloadavg()
        for r in range(a.rounds):
            for name in configs:
                print(f"round {r + 1}/{a.rounds}: {name} ...", end=" ", flush=True)
                res = run_child(a, name, Path(tmp))
                times = [s["step_s"] for s in res["steps"][a.warmup :]]
                print(
                    f"{statistics.median(times):.2f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB "
                    f"({res['process_s']:.0f} s)",
                    flush=True,
                )
                runs[name].append(res)
    load_after = os.getloadavg()
    summary = {name: summarise(name, rs, a.warmup) for name, rs in runs.items()}
    table = print_table(summary)
    print()
    print(table)
    if BASELINE in summary:
        print(
            f"\nTRL/this time > 1: faster than {BASELINE}; this/TRL peak RSS < 1: less memory. "
            f"Load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f}."
        )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "settings": {
            "teacher": str(a.teacher),
            "student": str(a.student),
            "dtype": "float32",
            "prompts": "examples/demo/train.jsonl (chat template, file order)",
            "batch_prompts": a.batch_size,
            "samples_per_prompt": 1,
            "max_new_tokens": a.max_new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "optimizer": "AdamW (torch), constant lr, no warmup, weight decay 0, clip 1.0",
            "lr": a.lr,
            "threads": a.threads,
            "rounds": a.rounds,
            "warmup_steps": a.warmup,
            "timed_steps": a.steps,
            "gradient_checkpointing": False,
            "order": configs,
        },
        "prompt_check": prompts,
        "environment": {
            "python": platform.python_version(),
            **{pkg: metadata.version(pkg) for pkg in ("kdrl", "torch", "transformers", "trl")},
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "baseline": BASELINE,
        "summary": summary,
        "ratios": {
            name: {
                "trl_over_this_step_time": summary[BASELINE]["median_step_s"] / s["median_step_s"],
                "this_over_trl_peak_rss": s["peak_rss_mb"] / summary[BASELINE]["peak_rss_mb"],
            }
            for name, s in summary.items()
            if BASELINE in summary
        },
        "runs": runs,
        "table": table,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
