"""Prompts: read a file or a `datasets` dataset, render each row, apply the length policy.

`load_prompts` turns the rows of a JSONL / JSON / Parquet / CSV file, or of a `load_dataset`
name or folder, into `Prompt`s. `PromptSampler` decides, deterministically and resumably, which
prompts each training step sees.

Errors in the data are `DataError`s naming the file, the row (``line N`` for JSON lines and CSV,
``row N`` otherwise, both 1-based) and the field; errors in how `data.*` keys combine are
`ConfigError`s naming the keys.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdrl.config.schema import DataConfig
from kdrl.config.validate import ConfigError
from kdrl.roundtrip import TokenizerCheck

logger = logging.getLogger(__name__)


Row = tuple[str, dict[str, Any]]  # (where the row is, e.g. "line 3"; its fields)


class DataError(ValueError):
    """A problem with the prompt data itself (file, row, field), not with the config keys."""


@dataclass
class Prompt:
    """One rendered prompt: ``index`` is its 0-based row in the source; ``text`` the full prompt
    string (chat template applied when `data.chat_template`) and ``ids`` its tokens, which are
    what the model is given; ``answer`` the reference for the reward (None without
    `data.answer_field`); ``truncated`` whether `truncate_left` cut it; ``user`` the last user
    message as written (for reports: ``text`` may start with a long system prompt); ``where``
    the file (or dataset) and row it came from, as error messages name it."""

    index: int
    text: str
    ids: list[int]
    answer: str | None
    truncated: bool
    user: str = ""
    where: str = ""


@dataclass
class PromptSet:
    """The prompts of ``source`` (the file or dataset as error messages name it), the number of
    rows it has, and how many of them `overlong_prompt: skip` dropped."""

    prompts: list[Prompt]
    source: str
    n_rows: int
    n_skipped: int


def load_prompts(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    path: str | None = None,
    split: str | None = None,
    limit: int = 0,
    key: str = "data.path",
) -> PromptSet:
    """Read and render the prompts of ``path`` (default ``cfg.path``) and ``split`` (default
    ``cfg.split``; ignored for a local file). ``limit > 0`` keeps the first ``limit`` prompts.
    ``key`` is the config key that named ``path``, for error messages."""
    path = cfg.path if path is None else path
    split = cfg.split if split is None else split
    if not path:
        raise ConfigError("data.path is empty: name a prompt file or a `datasets` dataset")
    template_fields = _check_data_config(cfg, tokenizer)
    source, n_rows, rows = _read_rows(path, cfg.name, split, key)
    if n_rows == 0:
        raise DataError(f"{source} has no rows")
    prompts: list[Prompt] = []
    skipped: list[str] = []  # rows that `skip` dropped, and rows that `truncate_left` cut
    cut: list[str] = []
    limit_key = f"data.max_prompt_tokens={cfg.max_prompt_tokens}"
    check, changed = TokenizerCheck(tokenizer), []
    for index, (where, fields) in enumerate(rows):
        at = f"{source} {where}"
        if not isinstance(fields, dict):
            raise DataError(f"{at}: expected an object, got {type(fields).__name__}")
        text, add_special, user = _render(cfg, tokenizer, fields, template_fields, at)
        answer = _answer(cfg, fields, at)  # checked before skipping, so no bad row goes unseen
        _check_tokenizes(check, user, "the prompt", at)
        _check_tokenizes(check, answer, "the reference answer (data.answer_field)", at)
        if check.changed(user):
            changed.append(where)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        truncated = len(ids) > cfg.max_prompt_tokens
        if truncated and cfg.overlong_prompt == "error":
            raise DataError(
                f"{at}: the prompt is {len(ids)} tokens, longer than {limit_key}; raise it, or "
                "set data.overlong_prompt to skip or truncate_left"
            )
        if truncated and cfg.overlong_prompt == "skip":
            skipped.append(where)
            continue
        if truncated:
            ids = ids[-cfg.max_prompt_tokens :]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            cut.append(where)
        prompts.append(Prompt(index, text, ids, answer, truncated, user, at))
        if len(prompts) == limit:
            break
    if changed:
        logger.warning(
            f"{source}: the tokenizer does not decode {len(changed)} prompts back to the same "
            f"text (a normaliser, or characters it drops): {_rows(changed)}"
        )
    if skipped:
        logger.warning(
            f"{source}: skipped {len(skipped)} prompts longer than {limit_key} "
            f"(data.overlong_prompt=skip): {_rows(skipped)}"
        )
    if cut:
        logger.warning(
            f"{source}: kept the last {cfg.max_prompt_tokens} tokens of {len(cut)} prompts longer "
            f"than {limit_key} (data.overlong_prompt=truncate_left): {_rows(cut)}"
        )
    if not prompts:
        raise DataError(
            f"{source}: every prompt is longer than {limit_key}, none is left; raise "
            "data.max_prompt_tokens"
        )
    return PromptSet(prompts, source, n_rows, len(skipped))


def _check_tokenizes(check: TokenizerCheck, text: str | None, what: str, at: str) -> None:
    lost = check.lost(text) if text else []
    if lost or (text and check.lost_ids(text)):
        chars = f"the characters {''.join(lost)!r}" if lost else "some of its text"
        raise DataError(
            f"{at}: {what} has {chars}, which the tokenizer cannot represent: they become its "
            f"{' / '.join(sorted(check.holes.values()))} id, so the model would see holes; use a "
            "tokenizer that covers them or remove them from the data"
        )


def _rows(where: list[str], shown: int = 5) -> str:
    """``line 2, line 7, and 3 more``: the first few rows of a list."""
    rest = len(where) - shown
    return ", ".join(where[:shown]) + (f", and {rest} more" if rest > 0 else "")


def _check_data_config(cfg: DataConfig, tokenizer: Any) -> set[str]:
    """Reject `data.*` combinations that cannot render; return the template's field names."""
    # Ranges and literals are checked by `kdrl.config.validate`; these rules tie keys together.
    for key in ("messages_field", "system_prompt"):
        # Roles only exist through a chat template; plain text cannot place them.
        if not cfg.chat_template and getattr(cfg, key) is not None:
            raise ConfigError(
                f"data.{key} needs data.chat_template=true (put fixed text in "
                f"data.prompt_template instead), got {getattr(cfg, key)!r}"
            )
    if cfg.messages_field is not None and cfg.prompt_template != "{prompt}":
        raise ConfigError(
            "data.prompt_template wraps data.prompt_field and must stay '{prompt}' when "
            f"data.messages_field is set, got {cfg.prompt_template!r}"
        )
    if cfg.chat_template and getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"tokenizer {name!r} has no chat template but data.chat_template is true; set "
            "data.chat_template=false to give the model the formatted prompt as plain text"
        )
    names = {name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name}
    # `{a.b}` and `{a[0]}` read the row field `a`.
    return {re.split(r"[.\[]", name, maxsplit=1)[0] for name in names}


def _read_rows(path: str, name: str | None, split: str, key: str) -> tuple[str, int, Iterable[Row]]:
    """(source, number of rows, rows) of a local file, or of `datasets.load_dataset`."""
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if file.is_file():
        if suffix not in _READERS:
            raise DataError(f"{path}: unknown file type {suffix!r}; use one of {list(_READERS)}")
        try:
            rows = _READERS[suffix](file)
        except UnicodeDecodeError as err:
            raise DataError(f"{path} {_undecodable(file)}: not UTF-8 text ({err.reason})") from err
        except OSError as err:
            raise DataError(f"{path}: cannot read the prompt file ({err})") from err
        return path, len(rows), rows
    if not file.is_dir() and (suffix in _READERS or path.startswith(("/", ".", "~"))):
        raise DataError(f"{key}: prompt file {path} does not exist")
    return _read_dataset(path, name, split, key)


def _read_jsonl(file: Path) -> list[Row]:
    rows = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{file} line {number}: not valid JSON ({err.msg})") from err
    return rows


def _read_json(file: Path) -> list[Row]:
    text = file.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        # `.json` is also used for JSON lines (e.g. by `Dataset.to_json`).
        return _read_jsonl(file)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{file} line {err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise DataError(f"{file}: expected a list of objects, got {type(items).__name__}")
    return [(f"row {i}", item) for i, item in enumerate(items, start=1)]


def _undecodable(file: Path) -> str:
    """``line N, column C`` of the first byte that is not UTF-8 (a decoder reading in chunks
    knows only the offset in its chunk)."""
    with file.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}, column {err.start + 1}"
    return "somewhere"  # the file changed since it was read


def _read_csv(file: Path) -> list[Row]:
    # Plain `csv` keeps every cell a string: a prompt like "0042" stays as written.
    rows = []
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # the header is line 1
        for item in reader:
            if None in item:  # where DictReader puts cells beyond the header's columns
                raise DataError(f"{file} line {start}: more cells than the header has columns")
            rows.append((f"line {start}", dict(item)))
            start = reader.line_num + 1
    return rows


def _read_parquet(file: Path) -> list[Row]:
    import pyarrow as pa  # a `datasets` dependency; imported only when needed
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except pa.ArrowException as err:
        raise DataError(f"{file}: not a readable Parquet file ({err})") from err
    return [(f"row {i}", item) for i, item in enumerate(table.to_pylist(), 1)]


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _read_dataset(
    path: str, name: str | None, split: str, key: str
) -> tuple[str, int, Iterable[Row]]:
    import datasets  # slow to import, and only hub names and folders need it

    source = f"{path}" + (f" ({name})" if name else "") + f" split {split}"
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (OSError, ValueError) as err:
        # Not found, offline, unknown split or config: say which key to fix.
        split_key = key.replace("path", "split")
        raise DataError(f"cannot load {source} ({key} / data.name / {split_key}): {err}") from err
    rows: Iterator[Row] = ((f"row {i}", item) for i, item in enumerate(ds, start=1))
    return source, len(ds), rows


def _render(
    cfg: DataConfig, tokenizer: Any, fields: dict[str, Any], template_fields: set[str], at: str
) -> tuple[str, bool, str]:
    """(prompt text, whether the tokenizer should add its special tokens when encoding it, the
    last user message)."""
    if cfg.messages_field is not None:
        messages = _messages(cfg, fields, at)
    else:
        text = _format_prompt(cfg, fields, template_fields, at)
        if not cfg.chat_template:
            # Plain text gets the tokenizer's BOS, as the model saw in pre-training.
            return text, True, text
        messages = [{"role": "user", "content": text}]
    if cfg.system_prompt is not None:
        if messages[0]["role"] == "system":
            raise DataError(
                f"{at}: field {cfg.messages_field!r} already starts with a system message and "
                "data.system_prompt is set too; set data.system_prompt=null to keep the row's"
            )
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    # The chat template writes any BOS itself.
    return text, False, user


def _format_prompt(
    cfg: DataConfig, fields: dict[str, Any], template_fields: set[str], at: str
) -> str:
    values = {}
    for name in sorted(template_fields):
        key = cfg.prompt_field if name == "prompt" else name
        setting = "data.prompt_field" if name == "prompt" else "data.prompt_template"
        value = _field(fields, key, setting, at)
        if name == "prompt" and not (isinstance(value, str) and value.strip()):
            raise DataError(
                f"{at}: field {key!r} (data.prompt_field) must be a non-empty string, "
                f"got {value!r:.60}"
            )
        if value is None:
            raise DataError(f"{at}: field {key!r} (used by data.prompt_template) is null")
        values[name] = value
    text = cfg.prompt_template.format(**values)
    if not text.strip():
        raise DataError(f"{at}: the prompt is empty after data.prompt_template")
    return text


def _field(fields: dict[str, Any], key: str, setting: str, at: str) -> Any:
    if key not in fields:
        raise DataError(f"{at}: missing field {key!r} ({setting}); the row has {sorted(fields)}")
    return fields[key]


def _messages(cfg: DataConfig, fields: dict[str, Any], at: str) -> list[dict[str, str]]:
    key = cfg.messages_field
    assert key is not None
    value = _field(fields, key, "data.messages_field", at)
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{at}: field {key!r} must be a non-empty list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    for i, m in enumerate(value):
        if not (
            isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
        ):
            raise DataError(
                f"{at}: field {key!r} message {i} must have string 'role' and 'content', got {m!r}"
            )
    if value[-1]["role"] == "assistant":
        # The model would be asked to continue after its own answer: likely an SFT record.
        raise DataError(
            f"{at}: field {key!r} ends with an assistant message; prompts end with a user turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(cfg: DataConfig, fields: dict[str, Any], at: str) -> str | None:
    key = cfg.answer_field
    if key is None:
        return None
    value = _field(fields, key, "data.answer_field", at)
    # Numeric answers are common in JSON / Parquet; bool is an int but never an answer.
    ok = isinstance(value, str) or (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )
    if not ok:
        raise DataError(
            f"{at}: field {key!r} (data.answer_field) must be a string or a number, got {value!r}"
        )
    answer = str(value).strip()
    if not answer:
        raise DataError(f"{at}: field {key!r} (data.answer_field) is empty")
    return answer
