"""The bad-input catalogue (docs/reliability.md, "Bad input"): inputs kdrl must refuse with one line
naming the file, row, key or model, and failures mid-run that must keep the work already
written (checkpoints and metrics of the steps before). Cases whose tests live next to the code
they check (test_config, test_data, test_preflight, ...) are listed in the catalogue only."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from kdrl.checkpoint import find_latest_checkpoint, verify_checkpoint
from kdrl.cli import main
from kdrl.config import ConfigError, load_config
from kdrl.config.schema import DataConfig
from kdrl.data import DataError, load_prompts
from kdrl.metrics import read_metrics
from kdrl.preflight import PreflightError
from kdrl.rewards import get_reward_fn
from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm
from kdrl.train import train


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(tiny_pair, prompts_file, out: Path, *extra: str) -> list[str]:
    """A 2-prompt x 2-sample run of the tiny pair: well under a second a step on one core."""
    student, teacher = tiny_pair
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts_file}",
        "data.answer_field=answer", "reward.fn=exact_match", "data.chat_template=false",
        f"train.output_dir={out}", "train.batch_size=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=8", "optim.lr=1e-3", "train.tensorboard=false", *extra,
    ]  # fmt: skip


def cli_error(capsys) -> str:
    """The one ``kdrl: error:`` line `main` printed (after any progress bar on stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdrl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def steps_kept(out: Path) -> list[int]:
    """Steps in metrics.jsonl, after checking every checkpoint folder left is complete."""
    folders = sorted((out / "checkpoints").iterdir())
    assert not [f.name for f in folders if f.name.startswith(".tmp-")]
    for folder in folders:
        verify_checkpoint(folder)
    return [r["step"] for r in read_metrics(out)]


# --- Prompt files ------------------------------------------------------------------------------


def test_jsonl_that_is_not_utf8_names_file_and_line(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(path=str(path)), tok)
    assert str(err.value) == (
        f"{path} line 2, column 16: not UTF-8 text (invalid continuation byte)"
    )


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_csv_or_json_that_is_not_utf8_names_the_file(tok, tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b"prompt\ncaf\xe9\n" if suffix == ".csv" else b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(path=str(path)), tok)
    column = 4 if suffix == ".csv" else 16
    assert str(err.value) == (
        f"{path} line 2, column {column}: not UTF-8 text (invalid continuation byte)"
    )


def test_json_list_with_a_syntax_error_names_file_and_line(tok, tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]\n')
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(path=str(path)), tok)
    assert str(err.value) == f"{path} line 3: not valid JSON (Expecting value)"


def test_corrupt_parquet_names_the_file(tok, tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not parquet\n" * 4)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
        load_prompts(DataConfig(path=str(path)), tok)


@pytest.mark.parametrize("policy", ["error", "skip", "truncate_left"])
def test_every_overlong_policy_names_the_rows(tok, tmp_path, caplog, policy):
    path = tmp_path / "len.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * n}) + "\n" for n in (3, 20, 5, 30)))
    cfg = DataConfig(path=str(path), chat_template=False, max_prompt_tokens=10,
                     overlong_prompt=policy)  # fmt: skip
    if policy == "error":
        with pytest.raises(DataError) as err:
            load_prompts(cfg, tok)
        assert str(err.value) == (
            f"{path} line 2: the prompt is 20 tokens, longer than data.max_prompt_tokens=10; "
            "raise it, or set data.overlong_prompt to skip or truncate_left"
        )
        return
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        ps = load_prompts(cfg, tok)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "kdrl.data"]
    if policy == "skip":
        assert [p.index for p in ps.prompts] == [0, 2]
        assert warning == (
            f"{path}: skipped 2 prompts longer than data.max_prompt_tokens=10 "
            "(data.overlong_prompt=skip): line 2, line 4"
        )
    else:
        assert [len(p.ids) for p in ps.prompts] == [3, 10, 5, 10]
        assert warning == (
            f"{path}: kept the last 10 tokens of 2 prompts longer than data.max_prompt_tokens=10 "
            "(data.overlong_prompt=truncate_left): line 2, line 4"
        )


# --- Config files and overrides ----------------------------------------------------------------


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher:\n  temperature: 1.0\n top_k: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"cannot parse {path}: line 3, column 2: expected <block end>, but found "
        "'<block mapping start>' (while parsing a block mapping started at line 1, column 1)"
    )


def test_unparsable_override_is_one_line_on_the_command_line(capsys):
    assert main(["config", "teacher.temperature=[1"]) == 2
    assert cli_error(capsys) == (
        "kdrl: error: cannot parse command line argument 'teacher.temperature=[1': line 1, "
        "column 3: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence "
        "started at line 1, column 1)"
    )


def test_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"student:\n  path: caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file '{path}' line 2, column 12: not UTF-8 text (invalid continuation byte)"
    )


# --- Models ------------------------------------------------------------------------------------


def test_missing_teacher_folder_names_key_and_path(tiny_pair, prompts_file, tmp_path, capsys):
    args = base(tiny_pair, prompts_file, tmp_path / "run", "teacher.path=/no/such/teacher")
    assert main(["train", *args]) == 2
    assert cli_error(capsys) == (
        "kdrl: error: teacher.path: model folder '/no/such/teacher' does not exist"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_folder_that_is_not_a_model_names_key_and_folder(tiny_pair, prompts_file, tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    cfg = load_config(
        None, base(tiny_pair, prompts_file, tmp_path / "run", f"student.path={empty}")
    )
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert str(err.value) == (
        f"student.path: '{empty}' is not a Hugging Face model folder (it has no config.json); "
        "give the folder that `save_pretrained` wrote, or a hub name"
    )


def test_unknown_hub_name_offline_is_one_line_naming_key_and_name(monkeypatch):
    import huggingface_hub.constants

    from kdrl.models import load_tokenizer

    # The flag is read when the library is imported, so patch the parsed value too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        load_tokenizer("nobody-kdrl/no-such-model", key="teacher.path")
    message = str(err.value)
    assert message.startswith(
        "teacher.path: cannot load the tokenizer of 'nobody-kdrl/no-such-model': "
    ), message
    assert "\n" not in message


def test_tokenizer_mismatch_is_refused_before_the_first_step(tiny_pair, prompts_file, tmp_path):
    # The teacher's tokenizer lacks the digits the student's ids stand for: the teacher would
    # score the student's sampled ids as other tokens.
    other = char_tokenizer(chars="abcdefghijklmnopqrstuvwxyz+= ")
    teacher = save_tiny(tmp_path / "teacher", other, tiny_causal_lm(other, seed=5))
    out = tmp_path / "run"
    cfg = load_config(None, base(tiny_pair, prompts_file, out, f"teacher.path={teacher}"))
    with pytest.raises(PreflightError) as err:
        train(cfg)
    first, *problems = str(err.value).splitlines()
    assert first == (
        f"student '{tiny_pair[0]}' and teacher '{teacher}' cannot be paired: the teacher scores "
        "the student's token ids, so both must give every student id the same token."
    )
    assert any("student token id(s) are not in the teacher tokenizer" in p for p in problems)
    assert any("are different tokens to the two tokenizers" in p for p in problems)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


# --- The run directory -------------------------------------------------------------------------


def test_output_dir_that_cannot_be_created_is_refused_first(tiny_pair, prompts_file, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    with pytest.raises(ValueError) as err:
        train(load_config(None, base(tiny_pair, prompts_file, out)))
    assert str(err.value) == (
        f"train.output_dir '{out}' is not writable: [Errno 20] Not a directory: '{out}'"
    )


def test_resume_without_a_checkpoint_is_refused(tiny_pair, prompts_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train(load_config(None, base(tiny_pair, prompts_file, out)), resume=True)
    assert str(err.value) == f"--resume: no complete checkpoint in {out}/checkpoints: no run there"


def test_resume_with_another_config_is_refused_unless_forced(tiny_pair, prompts_file, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, base(tiny_pair, prompts_file, out, "train.max_steps=1")))
    changed = load_config(None, base(tiny_pair, prompts_file, out, "train.max_steps=2",
                                     "optim.lr=0.002", "rollout.temperature=0.5"))  # fmt: skip
    with pytest.raises(ValueError) as err:
        train(changed, resume=True)
    assert str(err.value) == (
        f"--resume with a config that differs from {out}/config.yaml: "
        "rollout.temperature: 1.0 -> 0.5; optim.lr: 0.001 -> 0.002 (pass --force to resume anyway)"
    )
    assert steps_kept(out) == [1]
    train(changed, resume=True, force=True)
    assert steps_kept(out) == [1, 2]
    assert find_latest_checkpoint(out).name == "step-00000002"


# --- Failures mid-run keep the work already written --------------------------------------------

FLAKY_REWARD = """
from pathlib import Path

BROKEN = Path(__file__).with_name("broken")
calls = 0


def reward(completion, answer):
    global calls
    calls += 1
    # 6 calls of kdrl's start-up check, then 4 completions a step: the first call of step 3.
    if calls > 6 + 8 and BROKEN.exists():
        raise ZeroDivisionError("the reward's own bug")
    return float(completion.strip() == answer)
"""


def test_reward_fn_raising_at_step_3_keeps_steps_1_and_2(
    tiny_pair, prompts_file, tmp_path, monkeypatch, capsys
):
    name = "kdrl_test_flaky_reward"
    (tmp_path / f"{name}.py").write_text(FLAKY_REWARD)
    (tmp_path / "broken").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # a fresh call count
    out = tmp_path / "run"
    args = base(tiny_pair, prompts_file, out, f"reward.fn={name}:reward", "train.max_steps=3",
                "train.save_every_steps=1")  # fmt: skip
    assert main(["train", *args]) == 1
    line = cli_error(capsys)
    match = re.fullmatch(
        rf"kdrl: error: reward function {name}:reward on prompt (\d+) "
        rf"\({re.escape(str(prompts_file))} line (\d+), completion '.*'\) raised "
        r"ZeroDivisionError: the reward's own bug",
        line,
    )
    assert match, line
    assert int(match.group(2)) == int(match.group(1)) + 1  # 0-based prompt, 1-based line
    assert steps_kept(out) == [1, 2]
    assert find_latest_checkpoint(out).name == "step-00000002"
    # The bug fixed, the run continues from step 2 as if nothing had happened.
    (tmp_path / "broken").unlink()
    assert main(["train", *args, "--resume"]) == 0
    assert steps_kept(out) == [1, 2, 3]
    sys.modules.pop(name, None)


def test_reward_module_that_fails_to_import_names_it(tmp_path, monkeypatch):
    name = "kdrl_test_broken_reward"
    (tmp_path / f"{name}.py").write_text("def reward(completion, answer)\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        get_reward_fn(f"{name}:reward")
    assert str(err.value).startswith(
        f"reward.fn '{name}:reward': cannot import '{name}' (SyntaxError: expected ':' "
    ), str(err.value)


def test_malformed_teacher_reply_at_step_3_keeps_steps_1_and_2(tiny_pair, prompts_file, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from starlette.responses import Response
    from transformers import AutoModelForCausalLM

    from kdrl.teacher import LocalTeacher
    from kdrl.teacher_server import build_app
    from loopback import serving

    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    real = build_app(LocalTeacher(model, temperature=1.0, max_tokens_per_mb=16384,
                                  vocab=len(tok)), tok, model_name="tiny")  # fmt: skip
    scored = 0

    async def app(scope, receive, send):
        # The real teacher for two steps (one request each), then a reply that breaks the schema.
        nonlocal scored
        if scope["type"] == "http" and scope["path"] == "/v1/score":
            scored += 1
            if scored > 2:
                await Response(b'{"logprobs": [[-1.0]]}', media_type="application/json")(
                    scope, receive, send
                )
                return
        await real(scope, receive, send)

    out = tmp_path / "run"
    with serving(app) as server:
        args = base(
            tiny_pair,
            prompts_file,
            out,
            "teacher.backend=http",
            f"teacher.url={server.url}",
            "train.max_steps=3",
            "train.save_every_steps=1",
        )
        with pytest.raises(RuntimeError) as err:  # fmt: skip
            train(load_config(None, args))
    assert re.fullmatch(
        rf"teacher at {re.escape(server.url)}/v1/score sent a malformed response: logprobs: "
        r"expected 4 entries, got 1",
        str(err.value),
    ), str(err.value)
    assert steps_kept(out) == [1, 2]
    assert find_latest_checkpoint(out).name == "step-00000002"


# --- Caught at start-up, not after the first rollout -----------------------------------------


def test_a_misspelt_builtin_reward_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"got 'exactmatch'; did you mean 'exact_match'\?"):
        get_reward_fn("exactmatch")


def test_a_reward_with_the_wrong_signature_is_refused_before_training(
    tiny_pair, prompts_file, tmp_path, monkeypatch, capsys
):
    name = "kdrl_test_one_argument_reward"
    (tmp_path / f"{name}.py").write_text("def reward(completion):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", *base(tiny_pair, prompts_file, out, f"reward.fn={name}:reward")]) == 2
    line = cli_error(capsys)
    assert line.startswith(
        f"kdrl: error: reward.fn '{name}:reward' must take (completion, answer) and return a number"
    ), line
    assert not (out / "metrics.jsonl").exists()


def test_a_reward_that_needs_an_answer_without_an_answer_field_is_refused_before_training(
    tiny_pair, prompts_file, tmp_path, capsys
):
    out = tmp_path / "run"
    args = base(tiny_pair, prompts_file, out, "data.answer_field=null")
    assert main(["train", *args]) == 2
    assert cli_error(capsys) == (
        f"kdrl: error: reward.fn 'exact_match' fails on {prompts_file} line 1 (reference None, "
        "completion '') before training: ValueError: the exact_match reward needs a reference "
        "answer; set data.answer_field"
    )
    assert not (out / "metrics.jsonl").exists()


def test_a_missing_eval_file_names_eval_path(tiny_pair, prompts_file, tmp_path, capsys):
    missing = tmp_path / "held_out.jsonl"
    args = base(tiny_pair, prompts_file, tmp_path / "run", f"eval.path={missing}")
    assert main(["train", *args]) == 2
    assert cli_error(capsys) == f"kdrl: error: eval.path: prompt file {missing} does not exist"
