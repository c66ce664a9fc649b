"""The `kdrl` command line.

A subcommand is one ``_add_<name>`` function that declares its arguments and sets ``func`` to
the function that runs it, plus one entry in `_COMMANDS`. `main` dispatches and turns a user
error (`ValueError`: config, data, paths) into a one-line message with exit code 2, and kdrl's
own runtime errors (a reward function that raised, a non-finite loss) into exit code 1.
``KDRL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kdrl.config import ConfigError, dump_config, load_config, render_markdown


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--docs", action="store_true", help="print the Markdown reference of every key instead"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted override read as YAML, e.g. teacher.distill_loss_weight=0.01",
    )
    parser.set_defaults(func=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    if args.docs:
        if args.config is not None or args.overrides:
            raise ConfigError("--docs describes every key; it takes no --config or overrides")
        sys.stdout.write(render_markdown())
        return 0
    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted override read as YAML, e.g. teacher.distill_loss_weight=0.01",
    )  # fmt: skip


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in train.output_dir from its newest complete checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true",
        help="with --resume: accept a config that differs from the saved one",
    )  # fmt: skip
    parser.add_argument(
        "--restart", action="store_true",
        help="start over in a train.output_dir that holds a run (one that failed before its "
        "first checkpoint, say); its files move to previous-<time>/ inside it",
    )  # fmt: skip
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from kdrl.train import train  # heavy imports only for the commands that need them

    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    final = train(cfg, resume=args.resume, force=args.force, restart=args.restart)
    print(f"final model: {final}")
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument(
        "--model", required=True, metavar="DIR",
        help="student to evaluate: a checkpoint folder or any Hugging Face model folder/name",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, metavar="FILE", help="also write metrics as JSON")
    parser.add_argument(
        "--samples", type=int, default=3, metavar="N",
        help="print the first N answers: prompt, student, teacher, reference, reward (default 3)",
    )  # fmt: skip
    parser.add_argument(
        "--answers", type=Path, metavar="FILE",
        help="write every answer as JSON lines (default with --output: FILE.answers.jsonl)",
    )  # fmt: skip
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from kdrl.evaluate import evaluate_model

    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    _setup_logging()
    metrics, rows = evaluate_model(load_config(args.config, args.overrides), args.model)
    text = json.dumps(metrics, indent=2)
    print(text)
    for row in rows[: args.samples]:
        print(f"\n[{row['index']}] {row['prompt']}")
        for name in ("student", "teacher", "reference", "reward"):
            if row.get(name) is not None:
                print(f"  {name + ':':10s} {row[name]!r}" if name != "reward" else
                      f"  {'reward:':10s} {row[name]:g}")  # fmt: skip
    if args.samples and len(rows) > args.samples:
        print(f"\n({len(rows) - args.samples} more answers: --samples N prints more, --answers "
              "FILE writes them all)")  # fmt: skip
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    answers = args.answers or (args.output.with_suffix(".answers.jsonl") if args.output else None)
    if answers:
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        answers.write_text("".join(lines), encoding="utf-8")
        print(f"answers: {answers}")
    return 0


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a train.output_dir")
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from kdrl.report import summary_table, write_report  # matplotlib only for this command

    report = write_report(args.run_dir)
    print(summary_table(args.run_dir))
    print(f"report: {report}")
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--synthetic", action="store_true",
        help="the tiny synthetic demo (a character-level adder) instead of SmolLM2",
    )  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides of the demo config, e.g. train.max_steps=2",
    )  # fmt: skip
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from kdrl.demo.run import run_demo

    _setup_logging()
    run_demo(args.overrides, synthetic=args.synthetic)
    return 0


def _add_serve_teacher(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="PATH",
        help="the teacher: a Hugging Face model folder or hub name",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where native (CUDA, avx512_bf16/AMX CPUs), else float32",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=float, default=1.0,
        help="the teacher's temperature (the trainer's teacher.temperature)",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens-per-mb", type=int, default=16384, metavar="N",
        help="token budget of one forward pass (the trainer's teacher.mb_spec.max_tokens_per_mb)",
    )  # fmt: skip
    parser.add_argument(
        "--vocab", type=int, default=None, metavar="N",
        help="normalise over the first N token ids, as in-process scoring does with the "
        "student's output rows (default: all of the teacher's output rows)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="debug logs every request",
    )  # fmt: skip
    parser.set_defaults(func=_run_serve_teacher)


def _run_serve_teacher(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from kdrl.teacher_server import serve
    except ImportError as err:
        raise ValueError(
            f"kdrl serve-teacher needs starlette and uvicorn ({err}): pip install 'kdrl[serve]'"
        ) from err
    if args.temperature <= 0 or args.max_tokens_per_mb < 1:
        raise ValueError("--temperature must be > 0 and --max-tokens-per-mb >= 1")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    serve(
        args.model, host=args.host, port=args.port, log_level=args.log_level, dtype=args.dtype,
        device=args.device, temperature=args.temperature,
        max_tokens_per_mb=args.max_tokens_per_mb, vocab=args.vocab,
    )  # fmt: skip
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


# name -> (one-line help, function that declares the arguments)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (
        "the CPU demo: distill SmolLM2-135M into a pruned copy, evaluate, write a report",
        _add_demo,
    ),
    "train": (
        "train a student: on-policy distillation, GRPO, or both (KDRL)",
        _add_train,
    ),
    "eval": (
        "accuracy, agreement with the teacher, teacher-forced NLL, reverse KL and degeneracy "
        "signals on held-out prompts, for any saved model",
        _add_eval,
    ),
    "report": (
        "plots and a Markdown report (report.md) of a run directory: before/after, curves, samples",
        _add_report,
    ),
    "config": (
        "print the resolved, validated config (file, then overrides in order) as YAML",
        _add_config,
    ),
    "serve-teacher": (
        "serve a frozen teacher over HTTP for a trainer on another process or machine",
        _add_serve_teacher,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdrl",
        description="On-policy knowledge distillation of language models, alone or with GRPO.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments) in _COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``KEY=VALUE`` overrides may come before, between or after the
    options, in the order given (argparse alone stops collecting them at the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [x for x in extra if x.startswith("-") or "=" not in x]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``kdrl`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    args = parse(argv)
    from kdrl.stop import Stopped

    try:
        return args.func(args)
    except Stopped:  # SIGTERM/SIGINT: the run saved a checkpoint and logged how to resume
        return 0
    except ValueError as err:  # bad input: config, data, model paths, run directory
        if os.environ.get("KDRL_DEBUG"):
            raise
        print(f"kdrl: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a run that cannot go on (reward raised, non-finite loss, ...)
        if os.environ.get("KDRL_DEBUG") or type(err).__module__.split(".")[0] != "kdrl":
            raise
        print(f"kdrl: error: {err}", file=sys.stderr)
        return 1
