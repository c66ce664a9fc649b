"""Prompt loading (formats, rendering, errors, length policies) and the prompt sampler."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from kdrl.config.schema import DataConfig
from kdrl.config.validate import ConfigError
from kdrl.data import DataError, load_prompts
from kdrl.sampler import PromptSampler
from kdrl.tiny import char_tokenizer

GSM8K_MINI = Path(__file__).parent / "data" / "gsm8k_mini.jsonl"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def chatml(*turns: tuple[str, str]) -> str:
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return body + "<|im_start|>assistant\n"


# --- Rendering ---------------------------------------------------------------------------------


def test_gsm8k_mini_with_row_field_template_and_chat(tok):
    cfg = DataConfig(
        path=str(GSM8K_MINI), prompt_template="Q: {question}\nA:", answer_field="answer"
    )
    ps = load_prompts(cfg, tok)
    assert (ps.n_rows, ps.n_skipped, len(ps.prompts)) == (12, 0, 12)
    assert [p.index for p in ps.prompts] == list(range(12))
    first = json.loads(GSM8K_MINI.read_text().splitlines()[0])
    p = ps.prompts[0]
    assert p.text == chatml(("user", f"Q: {first['question']}\nA:"))
    assert p.ids == tok(p.text, add_special_tokens=False)["input_ids"]
    assert p.answer == first["answer"] and p.answer.endswith("#### 29")
    assert not p.truncated


def test_plain_text_without_chat_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "topic": "sums"}])
    cfg = DataConfig(path=path, chat_template=False, prompt_template="[{topic}] {prompt} =")
    (p,) = load_prompts(cfg, tok).prompts
    assert p.text == "[sums] 2+2? ="
    assert p.ids == tok("[sums] 2+2? =")["input_ids"]
    assert p.answer is None


def test_prompt_field_feeds_prompt_even_if_row_has_a_prompt_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "wrong", "question": "right"}])
    cfg = DataConfig(path=path, prompt_field="question", chat_template=False)
    assert load_prompts(cfg, tok).prompts[0].text == "right"


def test_system_prompt_goes_first(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    cfg = DataConfig(path=path, system_prompt="Be brief.")
    text = load_prompts(cfg, tok).prompts[0].text
    assert text == chatml(("system", "Be brief."), ("user", "hi"))


def test_messages_field(tok, tmp_path):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages, "prompt": "unused"}])
    cfg = DataConfig(path=path, messages_field="messages", system_prompt="S")
    text = load_prompts(cfg, tok).prompts[0].text
    assert text == chatml(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"))


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user"}], "message 0 must have string 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "message 0"),
        ([{"role": "user", "content": "q"}, "x"], "message 1"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "assistant"),
    ],
)
def test_malformed_messages(tok, tmp_path, value, needle):
    good = {"m": [{"role": "user", "content": "ok"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [good, {"m": value}])
    with pytest.raises(DataError, match=r"m\.jsonl line 2: field 'm'") as info:
        load_prompts(DataConfig(path=path, messages_field="m"), tok)
    assert needle in str(info.value)


def test_row_system_message_conflicts_with_system_prompt(tok, tmp_path):
    rows = [{"m": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = DataConfig(path=path, messages_field="m", system_prompt="other")
    with pytest.raises(DataError, match=r"line 1: field 'm' already starts with a system"):
        load_prompts(cfg, tok)
    assert load_prompts(DataConfig(path=path, messages_field="m"), tok).prompts[0].text == chatml(
        ("system", "s"), ("user", "q")
    )


# --- Data errors name file, row and field ------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "cfg_kwargs", "pattern"),
    [
        ({"question": "q"}, {}, r"line 2: missing field 'prompt' \(data.prompt_field\)"),
        ({"prompt": 42}, {}, r"line 2: field 'prompt' \(data.prompt_field\) must be a non-empty"),
        ({"prompt": "  "}, {}, r"line 2: field 'prompt' .* non-empty string, got '  '"),
        ({"prompt": None}, {}, r"line 2: field 'prompt' .* got None"),
        ({"prompt": "q"}, {"prompt_template": "{prompt} {hint}"}, r"line 2: missing field 'hint'"),
        ({"prompt": "q"}, {"answer_field": "ans"}, r"line 2: missing field 'ans'"),
        ({"prompt": "q", "ans": None}, {"answer_field": "ans"}, r"line 2: field 'ans' .* got None"),
        ({"prompt": "q", "ans": True}, {"answer_field": "ans"}, r"line 2: field 'ans' .* got True"),
        ({"prompt": "q", "ans": " "}, {"answer_field": "ans"}, r"line 2: field 'ans' .* is empty"),
        ([1, 2], {}, r"line 2: expected an object, got list"),
    ],
)
def test_bad_row_names_file_line_and_field(tok, tmp_path, row, cfg_kwargs, pattern):
    good = {"prompt": "fine", "ans": "1", "hint": "h"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=r"bad\.jsonl " + pattern):
        load_prompts(DataConfig(path=path, chat_template=False, **cfg_kwargs), tok)


def test_numeric_answers_become_strings(tok, tmp_path):
    rows = [{"prompt": "a", "ans": 42}, {"prompt": "b", "ans": 2.5}, {"prompt": "c", "ans": "7"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ps = load_prompts(DataConfig(path=path, answer_field="ans"), tok)
    assert [p.answer for p in ps.prompts] == ["42", "2.5", "7"]


def test_invalid_json_line_and_blank_lines(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl line 4: not valid JSON"):
        load_prompts(DataConfig(path=str(path)), tok)
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    ps = load_prompts(DataConfig(path=str(path)), tok)
    assert [p.index for p in ps.prompts] == [0, 1]  # rows, not lines


def test_missing_empty_and_unknown_files(tok, tmp_path):
    with pytest.raises(DataError, match=r"prompt file .*nope\.jsonl does not exist"):
        load_prompts(DataConfig(path=str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        load_prompts(DataConfig(path=str(tmp_path / "empty.jsonl")), tok)
    (tmp_path / "p.txt").write_text("hi\n")
    with pytest.raises(DataError, match=r"p\.txt: unknown file type '\.txt'"):
        load_prompts(DataConfig(path=str(tmp_path / "p.txt")), tok)
    with pytest.raises(ConfigError, match=r"data\.path is empty"):
        load_prompts(DataConfig(), tok)


# --- Config combinations -----------------------------------------------------------------------


def test_tokenizer_without_chat_template(tmp_path):
    bare = char_tokenizer()
    bare.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ConfigError, match=r"tokenizer .* no chat template.*chat_template=false"):
        load_prompts(DataConfig(path=path), bare)
    assert load_prompts(DataConfig(path=path, chat_template=False), bare).prompts[0].text == "a"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"chat_template": False, "messages_field": "m"}, "data.messages_field"),
        ({"chat_template": False, "system_prompt": "s"}, "data.system_prompt"),
        ({"messages_field": "m", "prompt_template": "Q: {prompt}"}, "data.prompt_template"),
    ],
)
def test_key_combinations_that_cannot_render(tok, tmp_path, kwargs, key):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ConfigError, match=key):
        load_prompts(DataConfig(path=path, **kwargs), tok)


# --- Length policy -----------------------------------------------------------------------------


def length_rows(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "len.jsonl", [{"prompt": "x" * n} for n in (3, 20, 5)])


def test_overlong_error_names_row_and_lengths(tok, tmp_path):
    cfg = DataConfig(path=length_rows(tmp_path), chat_template=False, max_prompt_tokens=10)
    with pytest.raises(DataError, match=r"len\.jsonl line 2: the prompt is 20 tokens, .*=10"):
        load_prompts(cfg, tok)


def test_overlong_skip_counts_and_logs_once(tok, tmp_path, caplog):
    path = length_rows(tmp_path)
    cfg = DataConfig(path=path, chat_template=False, max_prompt_tokens=10, overlong_prompt="skip")
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        ps = load_prompts(cfg, tok)
    assert [p.index for p in ps.prompts] == [0, 2]
    assert (ps.n_rows, ps.n_skipped) == (3, 1)
    warnings = [r for r in caplog.records if r.name == "kdrl.data"]
    assert len(warnings) == 1 and "skipped 1 prompts" in warnings[0].getMessage()
    cfg.max_prompt_tokens = 2
    with pytest.raises(DataError, match="every prompt is longer"):
        load_prompts(cfg, tok)


def test_overlong_truncate_left_keeps_the_end(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcdefghij"}, {"prompt": "xy"}])
    cfg = DataConfig(path=path, max_prompt_tokens=25, overlong_prompt="truncate_left")
    long, short = load_prompts(cfg, tok).prompts
    full = tok(chatml(("user", "abcdefghij")), add_special_tokens=False)["input_ids"]
    assert len(full) == 29
    assert long.truncated and long.ids == full[-25:]
    assert long.text == "r\nabcdefghij<|im_end|>\n<|im_start|>assistant\n"
    assert not short.truncated and short.text == chatml(("user", "xy"))


def test_limit_keeps_the_first_prompts(tok):
    ps = load_prompts(DataConfig(path=str(GSM8K_MINI), prompt_field="question"), tok, limit=5)
    assert [p.index for p in ps.prompts] == [0, 1, 2, 3, 4]
    assert ps.n_rows == 12


# --- Other formats -----------------------------------------------------------------------------


def test_json_list_and_json_lines_in_a_json_file(tok, tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"prompt": "a", "ans": 1}, {"prompt": "b", "ans": 2}]))
    cfg = DataConfig(path=str(listed), chat_template=False, answer_field="ans")
    assert [p.answer for p in load_prompts(cfg, tok).prompts] == ["1", "2"]
    listed.write_text(json.dumps([{"prompt": "a", "ans": 1}, {"prompt": "", "ans": 2}]))
    with pytest.raises(DataError, match=r"list\.json row 2: field 'prompt'"):
        load_prompts(cfg, tok)
    lines = write_jsonl(tmp_path / "lines.json", [{"prompt": "a"}, {"prompt": "b"}])
    assert len(load_prompts(DataConfig(path=lines), tok).prompts) == 2


def test_parquet_with_messages_and_numeric_answers(tok, tmp_path):
    import pandas as pd

    messages = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    pd.DataFrame({"m": messages, "ans": [7, 8]}).to_parquet(tmp_path / "p.parquet")
    cfg = DataConfig(path=str(tmp_path / "p.parquet"), messages_field="m", answer_field="ans")
    ps = load_prompts(cfg, tok)
    assert [p.text for p in ps.prompts] == [chatml(("user", "a")), chatml(("user", "b"))]
    assert [p.answer for p in ps.prompts] == ["7", "8"]
    pd.DataFrame({"prompt": ["a", None]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet row 2: field 'prompt'"):
        load_prompts(DataConfig(path=str(tmp_path / "bad.parquet")), tok)


def test_csv_keeps_strings_and_counts_file_lines(tok, tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "answer"])
        writer.writerow(["two\nlines", "0042"])  # one record over lines 2-3
        writer.writerow(["", "1"])
    cfg = DataConfig(path=str(path), chat_template=False, answer_field="answer")
    with pytest.raises(DataError, match=r"p\.csv line 4: field 'prompt'"):
        load_prompts(cfg, tok)
    ps = load_prompts(cfg, tok, limit=1)
    assert (ps.prompts[0].text, ps.prompts[0].answer) == ("two\nlines", "0042")
    path.write_text("prompt\nfine\na,extra\n")
    with pytest.raises(DataError, match=r"p\.csv line 3: more cells than the header"):
        load_prompts(cfg, tok)


def test_path_and_split_overrides(tok, tmp_path):
    other = write_jsonl(tmp_path / "eval.jsonl", [{"q": "held out"}])
    cfg = DataConfig(path=str(GSM8K_MINI), prompt_field="q", chat_template=False)
    ps = load_prompts(cfg, tok, path=other, split="test")  # a local file has no splits
    assert ps.source == other and ps.prompts[0].text == "held out"


# --- `datasets.load_dataset` -------------------------------------------------------------------


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The flags are read when the libraries are imported, so patch the parsed values too.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_dataset_folder_goes_through_load_dataset(tok, tmp_path, offline_datasets):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "c"}, {"prompt": ""}])
    cfg = DataConfig(path=str(folder), chat_template=False)
    ps = load_prompts(cfg, tok)
    assert [p.text for p in ps.prompts] == ["a", "b"] and ps.source.endswith("split train")
    with pytest.raises(DataError, match=r"my_dataset split test row 2: field 'prompt'"):
        load_prompts(cfg, tok, split="test")
    with pytest.raises(DataError, match=r"cannot load .*my_dataset split validation"):
        load_prompts(cfg, tok, split="validation")


def test_unknown_dataset_name_fails_fast_offline(tok, offline_datasets):
    cfg = DataConfig(path="nobody-kdrl/no-such-dataset", name="main")
    with pytest.raises(DataError, match=r"cannot load nobody-kdrl/no-such-dataset \(main\)"):
        load_prompts(cfg, tok)


# --- PromptSampler -----------------------------------------------------------------------------


def drain(sampler: PromptSampler) -> list[list[int]]:
    batches = []
    while (batch := sampler.next_batch()) is not None:
        batches.append(batch)
    return batches


def sampler(**kwargs: Any) -> PromptSampler:
    args: dict[str, Any] = dict(seed=3, shuffle=True, epochs=3, max_steps=0) | kwargs
    n_prompts, batch_size = args.pop("n_prompts", 10), args.pop("batch_size", 3)
    return PromptSampler(n_prompts, batch_size, **args)


def test_epochs_are_permutations_cut_into_full_batches():
    s = sampler()
    assert (s.steps_per_epoch, s.total_steps) == (3, 9)
    batches = drain(s)
    assert len(batches) == 9 and all(len(b) == 3 for b in batches)
    epochs = [[i for b in batches[e : e + 3] for i in b] for e in (0, 3, 6)]
    for seen in epochs:
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))  # one index dropped
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert s.next_batch() is None


def test_order_depends_only_on_seed():
    torch.manual_seed(0)
    a = drain(sampler())
    torch.manual_seed(1)
    torch.rand(5)
    assert drain(sampler()) == a
    assert drain(sampler(seed=4)) != a


def test_no_shuffle_and_max_steps():
    s = sampler(shuffle=False, max_steps=4)
    assert s.total_steps == 4
    assert drain(s) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    assert sampler(max_steps=100).total_steps == 9  # epochs end first


def test_batch_larger_than_prompt_set():
    with pytest.raises(ConfigError, match=r"train.batch_size must be in \[1, 10\].*got 11"):
        sampler(batch_size=11)


@pytest.mark.parametrize("k", [0, 2, 3, 7, 9])
def test_state_round_trip_continues_exactly(k):
    uninterrupted = drain(sampler())
    first = sampler()
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = sampler()
    resumed.load_state_dict(state)
    assert uninterrupted[:k] + drain(resumed) == uninterrupted


def test_state_from_another_setup_is_refused():
    state = sampler().state_dict()
    with pytest.raises(ValueError, match="saved with seed=3, this run has seed=4"):
        sampler(seed=4).load_state_dict(state)


# --- text the tokenizer cannot represent ---------------------------------------------------


def test_prompt_characters_the_tokenizer_lacks_are_refused_with_row_and_characters(tok, tmp_path):
    # The char tokenizer has no "é" or "ü": they would silently become its pad id.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "café über"}])
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(path=path, chat_template=False), tok)
    assert str(err.value) == (
        f"{path} line 2: the prompt has the characters 'éü', which the tokenizer cannot "
        "represent: they become its <|pad|> id, so the model would see holes; use a tokenizer "
        "that covers them or remove them from the data"
    )


def test_answer_characters_the_tokenizer_lacks_are_refused(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "reverse: ab", "answer": "bа"}]
    )  # Cyrillic а
    with pytest.raises(DataError, match=r"line 1: the reference answer \(data.answer_field\) has "
                       r"the characters 'а'"):  # fmt: skip
        load_prompts(DataConfig(path=path, answer_field="answer"), tok)


def test_a_pad_token_written_out_in_the_text_is_not_a_hole(tmp_path):
    tok = char_tokenizer(pad_is_eos=True)  # pad is <|im_end|>, which a row may spell out
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "say <|im_end|> please"}])
    assert len(load_prompts(DataConfig(path=path, chat_template=False), tok).prompts) == 1


def test_text_that_does_not_decode_back_is_warned_about(tmp_path, caplog):
    from tokenizers import normalizers

    lower = char_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # "ABC" comes back as "abc"
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "ABC"}])
    with caplog.at_level(logging.WARNING, logger="kdrl"):
        load_prompts(DataConfig(path=path, chat_template=False), lower)
    assert "the tokenizer does not decode 1 prompts back to the same text" in caplog.text
    assert "line 2" in caplog.text
