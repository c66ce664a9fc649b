"""The config schema describing itself: field docs, resolved field types, the Markdown reference.

Field documentation lives in ``schema.py`` as the string literal after each field ("attribute
docstrings"). Python drops those strings at run time, so they are read back from the source with
`ast`. The loader uses the same introspection for its error messages, and ``docs/config.md`` is
`render_markdown()` verbatim (a test keeps the two equal).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from kdrl.config import schema
from kdrl.config.schema import Config

REGENERATE_COMMAND = ".venv/bin/kdrl config --docs > docs/config.md"

_HEADER = f"""\
# Configuration reference

<!-- Generated from src/kdrl/config/schema.py; regenerate with `{REGENERATE_COMMAND}`. -->

A run is described by one YAML file whose nesting follows the blocks below (`teacher.mb_spec`
is written as `mb_spec:` inside `teacher:`). Keys left out keep their defaults; an unknown key,
a value of the wrong type or one out of range is an error that names the key. Any key can also
be set on the command line with a dotted override whose value is read as YAML, for example
`kdrl config --config run.yaml teacher.distill_loss_weight=0.01 teacher.kd_eps_clip=null`.
`kdrl config` prints the resolved, validated config, ready to save and reuse.
"""


class FieldInfo(NamedTuple):
    """One field of the tree, addressed by its dotted key."""

    key: str
    owner: type
    name: str
    type: Any


@functools.cache
def field_docs() -> dict[type, dict[str, str]]:
    """Map every dataclass of the schema to ``{field name: documentation}``."""
    tree = ast.parse(inspect.getsource(schema))
    docs: dict[type, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and dataclasses.is_dataclass(getattr(schema, node.name)):
            docs[getattr(schema, node.name)] = _attribute_docstrings(node)
    return docs


def _attribute_docstrings(node: ast.ClassDef) -> dict[str, str]:
    docs: dict[str, str] = {}
    for stmt, following in itertools.pairwise(node.body):
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        is_doc = (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        )
        if is_field and is_doc:
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of each field of a config dataclass.

    The schema uses postponed annotations, so ``Field.type`` is only a string; it is evaluated
    in the namespace of the module that defines the class.
    """
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def iter_fields(cls: type = Config, prefix: str = "") -> Iterator[FieldInfo]:
    """Every field of the tree in schema order; a sub-block's field is followed by its fields."""
    for name, tp in field_types(cls).items():
        yield FieldInfo(f"{prefix}{name}", cls, name, tp)
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{name}.")


def describe_type(tp: Any) -> str:
    """Human-readable type, as used in error messages and in the reference."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        parts = [describe_type(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(parts + ["null"] * nullable)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def render_markdown() -> str:
    """The reference of every key: one table per block (dotted key, type, default, description)."""
    sections = [_HEADER]
    blocks = [("", Config)] + [
        (f"{info.key}.", info.type) for info in iter_fields() if dataclasses.is_dataclass(info.type)
    ]
    for prefix, cls in blocks:
        sections.append(_render_block(prefix, cls))
    return "\n".join(sections)


def _render_block(prefix: str, cls: type) -> str:
    title = f"`{prefix.removesuffix('.')}`" if prefix else "Top level"
    lines = [f"## {title}", "", inspect.cleandoc(cls.__doc__ or ""), ""]
    lines += ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    defaults = cls()
    docs = field_docs()[cls]
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            continue  # a sub-block gets its own section
        cells = [
            f"`{prefix}{name}`",
            _cell(describe_type(tp)),
            f"`{_yaml_scalar(getattr(defaults, name))}`",
            _cell(docs[name]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    # A table cell is one line, and a bare '|' would end it.
    return " ".join(text.split()).replace("|", "\\|")


def _yaml_scalar(value: Any) -> str:
    """A default as the user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)
