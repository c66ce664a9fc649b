"""Peak memory of teacher scoring and of one training step: kdrl against the naive way.

    .venv/bin/python bench/memory.py [--vocabs 49152,151936] [--prompt 512] [--response 3584]
        [--layers 2] [--untied] [--gradient-checkpointing] [--threads 1] [--repeats 0]

One sequence of ``--prompt + --response`` tokens (512 + 3,584 = 4,096 by default) is scored by a
teacher and trained on by a student, for each vocabulary size (49,152: SmolLM2's; 151,936:
Qwen's). The models are random Llama configs with SmolLM2-135M's widths (hidden 576, MLP 1,536,
9 heads, 3 key/value heads) and ``--layers`` decoder layers, built in memory: the vocabulary is
what the logits cost depends on, the layers only add the same activations to every column. The
output embedding is tied to the input one, as in SmolLM2-135M and Qwen3-0.6B (``--untied``
gives each its own). Either way a training step holds two ``[V, H]`` float32 weight gradients at
its end (the lm_head's and the embedding's, summed when tied), in every column alike.

Columns, each the same work on the same tokens:

- ``naive``: what GKD-style trainers do. The model returns logits for all positions
  (``[1, 4096, V]`` float32), then ``log_softmax`` over them and a gather of the sampled ids;
  for training, kdrl's loss (``pg`` estimator, joined with GRPO) on those log-probs, backward.
- ``kdrl (logits)``: kdrl before `kdrl.fused`: logits for the response window only
  (``logits_to_keep``), chunked log-softmax (`kdrl.logprobs.token_logprobs`). Obtained by
  reporting every model as not `fused_eligible`.
- ``kdrl``: kdrl as it runs now: `LocalTeacher.score` and one micro-batch of
  `kdrl.update.policy_update` (``_microbatch_loss`` and its backward), which take the fused
  lm_head + log-prob path and never build a ``[tokens, V]`` tensor.

Method: every (task, column, vocabulary) runs in a fresh subprocess, so no case inherits another's
heap. The subprocess builds its model and batch, collects garbage, and reads its resident set
size (VmRSS in /proc/self/status): the baseline, with the models loaded. It then resets the
kernel's peak-RSS counter (writing ``5`` to /proc/self/clear_refs; Linux >= 4.0), runs the case
once, and reads the peak (VmHWM). **Peak extra memory = VmHWM - baseline**: everything the case
allocated and touched at its worst moment (activations, logits, gradients of the weights,
allocator slack), in MiB. Where clear_refs cannot be written, a thread samples VmRSS every
millisecond instead (large tensors live far longer than that); the JSON says which method ran.
The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc's default threshold rises
with every freed block up to 32 MiB and keeps blocks below it in the heap after they are freed,
so the RSS would still count activations released long before the peak; with a fixed threshold
every tensor's pages go back to the kernel when it is freed, the same for every column
(``--malloc-default`` measures without it). Each case first runs once on 16 tokens, so one-time
set-up (thread pools, kernel caches) is not counted, and drops that run's gradients.
Memory does not depend on CPU load; the seconds reported beside it do (a rough guide only;
``--repeats N`` times N more runs and reports their median).

Results: a table on stdout and ``bench/results/memory.json``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TASKS = ("teacher", "train")
COLUMNS = ("naive", "kdrl_logits", "kdrl")
TITLES = {"naive": "naive", "kdrl_logits": "kdrl (logits)", "kdrl": "kdrl"}
MMAP_THRESHOLD = 1 << 16
"""Bytes from which glibc serves an allocation with its own mmap (returned on free)."""
TARGET_RATIO = 8.0
"""Issue 6: kdrl's peak extra memory at most 1/8 of the naive way's (4,096 tokens, 151,936 ids)."""


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident set size over a block: the kernel's VmHWM after a reset, or sampling."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.baseline_kib = status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs reset"
            # The reset sets the peak to the current RSS; anything else means it did not work.
            if status_kib("VmHWM") > status_kib("VmRSS") + 4096:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
        self.sampled_kib = self.baseline_kib
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(0.001):
            self.sampled_kib = max(self.sampled_kib, status_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        end = status_kib("VmRSS")
        peak = status_kib("VmHWM") if self.method.startswith("VmHWM") else self.sampled_kib
        self.peak_kib = max(peak, end)
        self.extra_mib = (self.peak_kib - self.baseline_kib) / 1024


def build_model(vocab: int, layers: int, tied: bool, positions: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=positions,
        tie_word_embeddings=tied, pad_token_id=0, bos_token_id=None, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_batch(vocab: int, prompt: int, response: int):
    import torch

    from kdrl.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    t = prompt + response
    ids = torch.randint(2, vocab, (1, t), generator=g)
    resp = torch.zeros(1, t, dtype=torch.bool)
    resp[:, prompt:] = True
    behav = torch.where(resp, -torch.rand(1, t, generator=g), 0.0)
    return RolloutBatch(
        ids, torch.ones(1, t, dtype=torch.long), resp, behav, [0], torch.zeros(1, dtype=torch.bool)
    )


def naive_logprobs(model, batch):
    """``[1, T]`` log-probs of the batch's tokens (position t: log p(x_t | x_<t), 0 at t = 0)
    from the model's logits at every position, materialised in float32."""
    import torch

    logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp_BTV = logits_BTV[:, :-1].float().log_softmax(-1)
    lp_BT = logp_BTV.gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    return torch.cat([lp_BT.new_zeros(1, 1), lp_BT], dim=1)


def run_case(task: str, column: str, vocab: int, args) -> dict:
    import torch

    import kdrl.teacher
    import kdrl.update
    from kdrl.loss import kdrl_loss
    from kdrl.teacher import LocalTeacher, TeacherOutput
    from kdrl.update import LossSettings, UpdateBatch, _microbatch_loss

    torch.set_num_threads(args.threads)
    seq = args.prompt + args.response
    model = build_model(vocab, args.layers, not args.untied, seq, seed=1 if task == "train" else 2)
    batch = build_batch(vocab, args.prompt, args.response)
    if column == "kdrl_logits":  # kdrl as it was: every model materialises its window's logits
        kdrl.update.fused_eligible = kdrl.teacher.fused_eligible = lambda model: False
    mask_BT = batch.response_mask_BT
    settings = LossSettings(
        rl_loss_weight=1.0, distill_loss_weight=1.0, kd_estimator="pg", kd_discount=0.0,
        kd_eps_clip=None, jsd_beta=0.5, student_temperature=1.0, eps_clip=0.2,
        eps_clip_higher=None, c_clip=None, vocab=vocab,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    teacher_lp_BT = torch.where(mask_BT, -3 * torch.rand(mask_BT.shape, generator=g), 0.0)
    data = UpdateBatch(batch, TeacherOutput(teacher_lp_BT), torch.tensor([0.5]), torch.ones(1))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if task == "teacher":
        model.eval()
        scorer = LocalTeacher(model, temperature=1.0, max_tokens_per_mb=seq, vocab=vocab)
    else:
        model.train()

    def work(batch=batch, data=data, teacher_lp_BT=teacher_lp_BT) -> float:
        mask_BT = batch.response_mask_BT
        num_tokens = float(mask_BT.sum())
        if task == "teacher" and column == "naive":
            with torch.inference_mode():
                lp_BT = naive_logprobs(model, batch)
            return float(lp_BT[mask_BT].sum())
        if task == "teacher":
            return float(scorer.score(batch).logprobs_BT[mask_BT].sum())
        if column == "naive":
            lp_BT = naive_logprobs(model, batch)
            loss, _ = kdrl_loss(
                lp_BT, lp_BT.detach(), teacher_lp_BT, torch.full(lp_BT.shape, 0.5), mask_BT,
                rl_loss_weight=1.0, distill_loss_weight=1.0, kd_estimator="pg",
                num_tokens=num_tokens,
            )  # fmt: skip
        else:
            loss, _ = _microbatch_loss(model, data, [0], None, settings, num_tokens)
        loss.backward()
        return float(loss.detach())

    # Warm-up on 16 tokens: one-time initialisation (thread pools, kernel caches) is not the
    # case's memory. Its gradients are dropped, as kdrl's optimizer step drops them.
    small = build_batch(vocab, 4, 12)
    small_lp_BT = torch.where(small.response_mask_BT, -1.0, 0.0)
    work(small, UpdateBatch(small, TeacherOutput(small_lp_BT), data.advantages_B, torch.ones(1)),
         small_lp_BT)  # fmt: skip
    model.zero_grad(set_to_none=True)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        value = work()
        seconds = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):  # timing only, after the memory was measured
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    if times:
        seconds = sorted(times)[len(times) // 2]
    return {
        "task": task, "column": column, "vocab": vocab, "tokens": seq,
        "peak_extra_mib": round(peak.extra_mib, 1), "baseline_mib": round(peak.baseline_kib / 1024),
        "seconds": round(seconds, 2), "value": value, "method": peak.method,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="49152,151936")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--untied", action="store_true", help="untie input/output embeddings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="as student.gradient_checkpointing"
    )
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help=f"keep glibc's dynamic mmap threshold (default: fixed at {MMAP_THRESHOLD} bytes)",
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="time this many more runs; report their median"
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, column, vocab = args.child.split(":")
        print(json.dumps(run_case(task, column, int(vocab), args)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    passed = sys.argv[1:]
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for task in args.tasks.split(","):
            for column in args.columns.split(","):
                cmd = [sys.executable, __file__, *passed, "--child", f"{task}:{column}:{vocab}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{task}/{column}/{vocab} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"  {vocab} {task:<7} {column:<12} {r['peak_extra_mib']:>9.0f} MiB "
                      f"{r['seconds']:>7.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    summary = summarise(rows)
    print(table(summary, args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    import torch

    meta = {
        "torch": torch.__version__,
        "method": rows[0]["method"],
        "malloc_mmap_threshold": None if args.malloc_default else MMAP_THRESHOLD,
        "load_average": os.getloadavg(),
        "settings": settings,
    }
    out.write_text(json.dumps({**meta, "cases": rows, "summary": summary}, indent=2) + "\n")
    print(f"\nwritten: {out}")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (vocabulary, task): each column's peak extra MiB and naive / kdrl."""
    out = []
    keys = dict.fromkeys((r["vocab"], r["task"]) for r in rows)
    for vocab, task in keys:
        cells = {r["column"]: r for r in rows if (r["vocab"], r["task"]) == (vocab, task)}
        row = {"vocab": vocab, "task": task, "tokens": next(iter(cells.values()))["tokens"]}
        for column, r in cells.items():
            row[f"{column}_mib"] = r["peak_extra_mib"]
            row[f"{column}_s"] = r["seconds"]
        values = [r["value"] for r in cells.values()]
        # Every column does the same work: the loss (or summed log-probs) must agree.
        row["value_spread"] = (max(values) - min(values)) / max(abs(v) for v in values)
        if "naive" in cells and "kdrl" in cells:
            row["naive_over_kdrl"] = round(
                cells["naive"]["peak_extra_mib"] / max(cells["kdrl"]["peak_extra_mib"], 1.0), 1
            )
        out.append(row)
    return out


def table(summary: list[dict], args) -> str:
    head = (
        f"Peak extra memory (MiB above the loaded models), 1 sequence of {args.prompt} + "
        f"{args.response} tokens, {args.layers} layers, "
        f"{'untied' if args.untied else 'tied'} embeddings, {args.threads} thread(s)"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
    )
    cols = [c for c in COLUMNS if any(f"{c}_mib" in r for r in summary)]
    lines = [head, ""]
    header = f"| {'vocab':>7} | {'task':<7} |" + "".join(f" {TITLES[c]:>13} |" for c in cols)
    header += " naive / kdrl | seconds (" + ", ".join(TITLES[c] for c in cols) + ") |"
    lines += [header, "|" + "|".join("-" * (len(p)) for p in header.split("|")[1:-1]) + "|"]
    for r in summary:
        line = f"| {r['vocab']:>7} | {r['task']:<7} |"
        line += "".join(f" {r.get(f'{c}_mib', float('nan')):>13.0f} |" for c in cols)
        ratio = r.get("naive_over_kdrl")
        line += f" {ratio:>11.1f}x |" if ratio is not None else f" {'':>12} |"
        line += " " + ", ".join(f"{r.get(f'{c}_s', float('nan')):.1f}" for c in cols) + " |"
        lines.append(line)
    spread = max(r["value_spread"] for r in summary)
    lines.append(f"\nLoss / summed log-probs agree across columns to {spread:.1e} (relative).")
    lines.append(
        f"Target (issue 6): naive / kdrl >= {TARGET_RATIO:g} at 151,936 ids, 4,096 tokens."
    )
    for r in summary:
        if r["vocab"] == 151936 and r.get("naive_over_kdrl") is not None:
            ok = "met" if r["naive_over_kdrl"] >= TARGET_RATIO else "NOT met"
            lines.append(f"  {r['task']}: {r['naive_over_kdrl']:.1f}x -> {ok}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
