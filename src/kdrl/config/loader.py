"""YAML file + dotted command-line overrides -> a validated `Config`, and back to YAML.

This is the boundary where user input is checked. Every problem raises `ConfigError` (a
`ValueError`) that names the dotted key and where the value came from, so `kdrl` can print it
as one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from kdrl.config.docs import describe_type, field_types, iter_fields
from kdrl.config.schema import Config
from kdrl.config.validate import ConfigError, validate

# --- YAML dialect ------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# PyYAML implements YAML 1.1, which reads `1e-3` as a string (its floats need a dot and a signed
# exponent) and `yes`/`no`/`on`/`off` as booleans. Config values follow YAML 1.2 on both points,
# so `lr=1e-3` is a float and `student.path=on` stays a string.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Loader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 booleans and exponent floats that rejects duplicate keys."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.name = source  # PyYAML's error marks would otherwise say "<unicode string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML silently keeps the last of two equal keys; in a config that hides a mistake.
        first_line: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in first_line:
                raise ConfigError(
                    f"duplicate key {key!r} in {self.source}, line {line} "
                    f"(first given on line {first_line[key]})"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or the loader's dialect would read as another type."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _YAML12_BOOL, list("tTfF"))
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789."))


def _parse_yaml(text: str, source: str) -> Any:
    loader = _Loader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {source}: {_yaml_problem(err)}") from err
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, what, and what it was inside."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem is None:
        return " ".join(str(err).split())
    mark = err.problem_mark or err.context_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    text += err.problem
    if err.context:
        inside = err.context_mark
        text += f" ({err.context}" + (
            f" started at line {inside.line + 1}, column {inside.column + 1})" if inside else ")"
        )
    return text


def _read_file(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # `err.object` is the whole file
        line = err.object.count(b"\n", 0, err.start) + 1
        column = err.start - err.object.rfind(b"\n", 0, err.start)
        raise ConfigError(
            f"config file {str(path)!r} line {line}, column {column}: not UTF-8 text ({err.reason})"
        ) from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from err
    data = _parse_yaml(text, str(path))
    if data is None:  # empty, or only comments: every key keeps its default
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got a {type(data).__name__}"
        )
    return data


# --- Building the tree -------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None: all defaults), apply dotted overrides in order, then validate.

    An override is ``dotted.key=value`` with the value read as YAML, so ``null``, ``true``,
    ``1e-3`` and plain strings work, and a mapping merges into a block:
    ``teacher.mb_spec.max_tokens_per_mb=4096``, ``teacher={temperature: 2.0, top_k: 8}``.
    """
    cfg = Config() if path is None else config_from_dict(_read_file(Path(path)), str(path))
    for text in overrides:
        source = f"command line argument {text!r}"
        key, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"{source} must look like key=value, e.g. teacher.temperature=1.0")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{source} has an empty part in its key {key!r}")
        nested: Any = _parse_yaml(raw, source)
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, nested, "", source)
    validate(cfg)
    return cfg


def config_from_dict(data: Mapping[Any, Any], source: str = "<dict>") -> Config:
    """Build a `Config` from nested mappings, checking keys and types (not ranges: `validate`).

    Keys left out keep their defaults; ``source`` names the origin of ``data`` in errors.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a mapping of keys, got a {type(data).__name__}")
    cfg = Config()
    _apply(cfg, data, "", source)
    return cfg


def _apply(block: Any, data: Mapping[Any, Any], prefix: str, source: str) -> None:
    """Set fields of the dataclass ``block`` from ``data``, merging into sub-blocks."""
    types_ = field_types(type(block))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(f"unknown key {key!r} in {source}; {_suggest(name, prefix, types_)}")
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise _type_error(key, tp, value, source)
            _apply(getattr(block, name), value, f"{key}.", source)
        else:
            setattr(block, name, _convert(value, tp, key, source))


def _suggest(name: Any, prefix: str, siblings: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(siblings), n=1)
    if close:
        return f"did you mean {prefix + close[0]!r}?"
    # A key written in the wrong block, e.g. top-level `distill_loss_weight`.
    elsewhere = [info.key for info in iter_fields() if info.name == name]
    if elsewhere:
        return f"did you mean {elsewhere[0]!r}?"
    return "valid keys here: " + ", ".join(prefix + sibling for sibling in siblings)


_INVALID = object()


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    converted = _converted(value, tp)
    if converted is _INVALID:
        raise _type_error(key, tp, value, source)
    return converted


def _converted(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ``_INVALID``. Only lossless, unsurprising conversions."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            converted = _converted(value, arg) if arg is not type(None) else _INVALID
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is Literal:
        # Compare types too: `True == 1`, and a Literal of strings must not accept other types.
        ok = any(type(value) is type(c) and value == c for c in typing.get_args(tp))
        return value if ok else _INVALID
    if tp is bool or tp is str:
        return value if isinstance(value, tp) else _INVALID
    if isinstance(value, bool):  # bool is an int subclass; `true` is never a number here
        return _INVALID
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # written as 4096.0 or 4e3
        return value if isinstance(value, int) else _INVALID
    if tp is float:
        return float(value) if isinstance(value, int | float) else _INVALID
    raise AssertionError(f"schema type {tp!r} has no conversion rule")


def _type_error(key: str, tp: Any, value: Any, source: str) -> ConfigError:
    message = (
        f"invalid value for {key!r} in {source}: expected {describe_type(tp)}, "
        f"got {value!r} ({type(value).__name__})"
    )
    choices = [
        str(choice)
        for arg in (tp, *typing.get_args(tp))
        if typing.get_origin(arg) is Literal
        for choice in typing.get_args(arg)
    ]
    close = difflib.get_close_matches(str(value), choices, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    elif _accepts_str(tp) and isinstance(value, Mapping | list):
        # `Q: {question}` or `[a, b]` read as YAML: a mapping or a list, not the text meant.
        message += (
            "; YAML read the value as a "
            + ("mapping" if isinstance(value, Mapping) else "list")
            + f", not as text: put it in quotes (on the command line {key}='\"...\"')"
        )
    return ConfigError(message)


def _accepts_str(tp: Any) -> bool:
    return tp is str or str in typing.get_args(tp)


# --- Back to YAML ------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict of the config, keys in schema order."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The config as block-style YAML in schema order; also written to ``path`` when given.

    `load_config` of the written file gives back an equal `Config`.
    """
    text = yaml.dump(
        config_to_dict(cfg),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
