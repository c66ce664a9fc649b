"""The `kdrl` command line.

A subcommand is one ``_add_<name>`` function that declares its arguments and sets ``func`` to
the function that runs it, plus one entry in `_COMMANDS`. `main` dispatches and turns a
`ConfigError` into a one-line message with exit code 2 (the code argparse uses for usage errors).
"""

from __future__ import annotations

import argparse
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


# name -> (one-line help, function that declares the arguments)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "config": (
        "print the resolved, validated config (file, then overrides in order) as YAML",
        _add_config,
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


def main(argv: list[str] | None = None) -> int:
    """Run ``kdrl`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"kdrl: error: {err}", file=sys.stderr)
        return 2
