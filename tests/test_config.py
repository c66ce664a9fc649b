"""The config boundary: defaults, docs, YAML + overrides, every error path, round trip, CLI."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from kdrl.cli import main
from kdrl.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    render_markdown,
    validate,
)
from kdrl.config.docs import REGENERATE_COMMAND, field_docs, iter_fields
from kdrl.config.schema import MicroBatchSpec, TeacherConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and documentation ----------------------------------------------------------------


def test_defaults() -> None:
    cfg = Config()
    assert cfg.teacher.rl_loss_weight == 1.0
    assert cfg.teacher.distill_loss_weight == 0.005
    assert cfg.teacher.temperature == 1.0
    assert cfg.teacher.mb_spec.max_tokens_per_mb == MicroBatchSpec().max_tokens_per_mb
    assert load_config(None) == cfg  # the defaults pass validation


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    seen = 0
    for info in iter_fields():
        assert docs[info.owner].get(info.name, "").strip(), f"{info.key} has no docstring"
        seen += 1

    # Guards against iter_fields silently walking nothing.
    def count(cls) -> int:  # fields of a block, counting shared sub-blocks at each use
        hints = typing.get_type_hints(cls)
        return sum(1 + (count(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else 0)
                   for f in dataclasses.fields(cls))  # fmt: skip

    assert seen == count(Config)


def test_field_docs_are_dedented_attribute_strings() -> None:
    doc = field_docs()[TeacherConfig]["kd_estimator"]
    assert doc.startswith("Distillation loss.")
    assert "\n`seed_k1` the reference's joint term" in doc  # continuation lines lose their indent
    assert field_docs()[MicroBatchSpec] == {
        "max_tokens_per_mb": "Most tokens (prompt + response, all sequences) in one forward pass."
    }


def test_markdown_has_one_row_per_leaf_and_one_section_per_block() -> None:
    text = render_markdown()
    for info in iter_fields():
        if dataclasses.is_dataclass(info.type):
            assert f"## `{info.key}`" in text
        else:
            assert f"| `{info.key}` |" in text
    assert "| `teacher.kd_eps_clip` | float or null | `null` |" in text
    assert "| `teacher.distill_loss_weight` | float | `0.005` |" in text


def test_committed_reference_matches_schema() -> None:
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), (
        f"docs/config.md is out of date; regenerate it with `{REGENERATE_COMMAND}`"
    )


# --- loading -----------------------------------------------------------------------------------


def test_yaml_file_sets_nested_values_and_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "seed: 7\n"
        "teacher:\n"
        "  path: /models/teacher\n"
        "  distill_loss_weight: 1e-3\n"  # YAML 1.1 would read this as a string
        "  kd_eps_clip: 0.2\n"
        "  mb_spec:\n"
        "    max_tokens_per_mb: 2048\n"
        "grpo:\n"
        "  adv_std_norm: false\n",
    )
    cfg = load_config(path)
    assert cfg.seed == 7
    assert cfg.teacher.path == "/models/teacher"
    assert cfg.teacher.distill_loss_weight == 1e-3
    assert cfg.teacher.kd_eps_clip == 0.2
    assert cfg.teacher.mb_spec.max_tokens_per_mb == 2048
    assert cfg.grpo.adv_std_norm is False
    assert cfg.teacher.temperature == 1.0
    assert cfg.rollout == Config().rollout


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


def test_overrides_nested_null_and_order(tmp_path: Path) -> None:
    path = write(tmp_path, "teacher:\n  kd_eps_clip: 0.2\n  temperature: 2.0\n")
    cfg = load_config(
        path,
        [
            "teacher.mb_spec.max_tokens_per_mb=4096",
            "teacher.kd_eps_clip=null",
            "teacher.distill_loss_weight=0.01",
            "student.path=my model",
            "grpo.adv_std_norm=false",
            "seed=3",
            "seed=4",  # later overrides win
        ],
    )
    assert cfg.teacher.mb_spec.max_tokens_per_mb == 4096
    assert cfg.teacher.kd_eps_clip is None
    assert cfg.teacher.distill_loss_weight == 0.01
    assert cfg.teacher.temperature == 2.0  # from the file, untouched by the overrides
    assert cfg.student.path == "my model"
    assert cfg.grpo.adv_std_norm is False
    assert cfg.seed == 4


def test_mapping_override_merges_into_block() -> None:
    cfg = load_config(None, ["teacher={temperature: 2.0, top_k: 8}"])
    assert (cfg.teacher.temperature, cfg.teacher.top_k) == (2.0, 8)
    assert cfg.teacher.distill_loss_weight == 0.005


def test_yaml12_scalars_in_overrides() -> None:
    cfg = load_config(None, ["student.path=on", "teacher.path=no", "grpo.reward_bias=-1.5E+2"])
    assert cfg.student.path == "on"  # YAML 1.1 would make these booleans
    assert cfg.teacher.path == "no"
    assert cfg.grpo.reward_bias == -150.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.temperature", "must look like key=value"),
        ("teacher..temperature=1", "empty part in its key 'teacher..temperature'"),
        ("=1", "empty part"),
        ("teacher.temperature=[1", "cannot parse command line argument"),
    ],
)
def test_malformed_override(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


# --- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("techer:\n  path: x\n", "unknown key 'techer' in {path}; did you mean 'teacher'?"),
        (
            "teacher:\n  distil_loss_weight: 0.1\n",
            "unknown key 'teacher.distil_loss_weight' in {path}; "
            "did you mean 'teacher.distill_loss_weight'?",
        ),
        (
            "teacher:\n  mb_spec:\n    max_token_per_mb: 1\n",
            "unknown key 'teacher.mb_spec.max_token_per_mb' in {path}; "
            "did you mean 'teacher.mb_spec.max_tokens_per_mb'?",
        ),
        # Right name, wrong block: point at where it lives.
        ("eps_clip: 0.1\n", "unknown key 'eps_clip' in {path}; did you mean 'grpo.eps_clip'?"),
        ("zzz: 1\n", "unknown key 'zzz' in {path}; valid keys here: seed, student, rollout"),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value).startswith(message.format(path=path))


def test_unknown_key_on_command_line() -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["teacher.distil_loss_weight=0.01"])
    assert str(err.value) == (
        "unknown key 'teacher.distil_loss_weight' in command line argument "
        "'teacher.distil_loss_weight=0.01'; did you mean 'teacher.distill_loss_weight'?"
    )


def test_config_from_dict_names_its_source() -> None:
    with pytest.raises(ValueError, match=re.escape("unknown key 'rollout.n_sample' in checkpoint")):
        config_from_dict({"rollout": {"n_sample": 2}}, "checkpoint")
    with pytest.raises(ValueError, match="checkpoint must be a mapping"):
        config_from_dict([1, 2], "checkpoint")  # type: ignore[arg-type]
    assert config_from_dict({"rollout": {"n_samples": 2}}).rollout.n_samples == 2


# --- types -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grpo.adv_std_norm=1", "'grpo.adv_std_norm' .*expected bool, got 1 \\(int\\)"),
        ("grpo.adv_std_norm='yes'", "expected bool, got 'yes' \\(str\\)"),
        ("grpo.adv_std_norm=yes", "expected bool, got 'yes' \\(str\\)"),
        ("seed=true", "'seed' .*expected int, got True \\(bool\\)"),
        ("seed=1.5", "expected int, got 1.5 \\(float\\)"),
        ("rollout.n_samples='4'", "expected int, got '4' \\(str\\)"),
        ("teacher.temperature=true", "'teacher.temperature' .*expected float, got True"),
        ("teacher.temperature=hot", "expected float, got 'hot' \\(str\\)"),
        ("student.path=1", "'student.path' .*expected str, got 1 \\(int\\)"),
        ("student.path=null", "expected str, got None"),
        ("teacher.kd_eps_clip=wide", "expected float or null, got 'wide'"),
        ("teacher.top_k=2.5", "expected int or null, got 2.5"),
        ("teacher.kd_estimator=jds", "expected one of 'pg', .*got 'jds'.*; did you mean 'jsd'\\?"),
        ("student.dtype=bf16", "expected one of 'float32', 'bfloat16', 'float16'"),
        ("teacher.kd_estimator=1", "expected one of .*got 1 \\(int\\)"),
        ("teacher.mb_spec=4096", "'teacher.mb_spec' .*expected mapping, got 4096"),
        ("teacher=[1]", "'teacher' .*expected mapping, got \\[1\\]"),
    ],
)
def test_wrong_type(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_accepted_type_conversions() -> None:
    cfg = load_config(
        None,
        ["teacher.temperature=2", "teacher.mb_spec.max_tokens_per_mb=4e3", "teacher.top_k=null"],
    )
    assert cfg.teacher.temperature == 2.0 and type(cfg.teacher.temperature) is float
    max_tokens = cfg.teacher.mb_spec.max_tokens_per_mb
    assert max_tokens == 4000 and type(max_tokens) is int
    assert cfg.teacher.top_k is None


def test_wrong_type_in_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "teacher: 3\n")
    message = f"'teacher' in {path}: expected mapping, got 3"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path)


# --- file-level errors -------------------------------------------------------------------------


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nteacher:\n  temperature: 1.0\n  temperature: 2.0\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value) == (
        f"duplicate key 'temperature' in {path}, line 4 (first given on line 3)"
    )


def test_duplicate_top_level_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nrollout: {}\nseed: 2\n")
    with pytest.raises(ValueError, match=re.escape(f"duplicate key 'seed' in {path}, line 3")):
        load_config(path)


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just text\n", "str")])
def test_non_mapping_document(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    pattern = re.escape(f"config file '{path}' must hold a mapping") + f".*got a {kind}$"
    with pytest.raises(ValueError, match=pattern):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=re.escape(f"config file '{path}' does not exist")):
        load_config(path)


def test_unparsable_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "teacher: [1\n")
    with pytest.raises(ValueError, match=re.escape(f"cannot parse {path}")):
        load_config(path)


# --- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.rl_loss_weight=-0.1"], "teacher.rl_loss_weight must be >= 0"),
        (["teacher.distill_loss_weight=-1"], "teacher.distill_loss_weight must be >= 0"),
        (
            ["teacher.rl_loss_weight=0", "teacher.distill_loss_weight=0"],
            "teacher.rl_loss_weight and teacher.distill_loss_weight are both 0",
        ),
        (["teacher.temperature=0"], "teacher.temperature must be > 0, got 0.0"),
        (["rollout.temperature=-1"], "rollout.temperature must be > 0"),
        (["rollout.top_p=0"], "rollout.top_p must be in \\(0, 1\\]"),
        (["rollout.top_p=1.01"], "rollout.top_p must be in \\(0, 1\\]"),
        (["rollout.n_samples=0"], "rollout.n_samples must be >= 1"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens must be >= 1"),
        (["teacher.mb_spec.max_tokens_per_mb=0"], "teacher.mb_spec.max_tokens_per_mb must be"),
        (["teacher.kd_discount=-0.1"], "teacher.kd_discount must be in \\[0, 1\\]"),
        (["teacher.kd_discount=1.5"], "teacher.kd_discount must be in \\[0, 1\\]"),
        (
            ["teacher.kd_estimator=k2", "teacher.kd_discount=0.5"],
            "teacher.kd_discount must be 0 when teacher.kd_estimator is 'k2' "
            "\\(its per-token form has no discount\\)",
        ),
        (
            ["teacher.kd_estimator=seed_k1", "teacher.kd_discount=1"],
            "teacher.kd_discount must be 0 when teacher.kd_estimator is 'seed_k1'",
        ),
        (["teacher.kd_eps_clip=0"], "teacher.kd_eps_clip must be > 0"),
        (["grpo.eps_clip=0"], "grpo.eps_clip must be > 0"),
        (["grpo.eps_clip_higher=-0.2"], "grpo.eps_clip_higher must be > 0"),
        (["grpo.c_clip=1"], "grpo.c_clip must be > 1"),
        (["teacher.jsd_beta=-0.5"], "teacher.jsd_beta must be in \\[0, 1\\]"),
        (["teacher.jsd_beta=1.5"], "teacher.jsd_beta must be in \\[0, 1\\]"),
        (["teacher.top_k=0"], "teacher.top_k must be >= 1"),
        (["grpo.reward_scaling=.nan"], "grpo.reward_scaling must be finite"),
        (["teacher.temperature=.inf"], "teacher.temperature must be finite"),
    ],
)
def test_validate_rejects(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["teacher.rl_loss_weight=0"],  # pure distillation
        ["teacher.distill_loss_weight=0"],  # pure RL
        ["rollout.top_p=1", "teacher.kd_discount=1", "teacher.jsd_beta=0"],
        ["teacher.jsd_beta=1", "teacher.top_k=1", "grpo.c_clip=1.001"],
        ["teacher.kd_estimator=k2", "teacher.kd_eps_clip=0.2", "grpo.eps_clip_higher=0.28"],
    ],
)
def test_validate_accepts_boundaries(overrides: list[str]) -> None:
    validate(load_config(None, overrides))


def test_validate_checks_a_config_built_in_code() -> None:
    cfg = Config()
    cfg.rollout.n_samples = 0
    with pytest.raises(ConfigError, match=re.escape("rollout.n_samples must be >= 1, got 0")):
        validate(cfg)


# --- round trip --------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "teacher.distill_loss_weight=0.005",
            "teacher.kd_eps_clip=1e-8",
            "teacher.temperature=0.7",
            "teacher.top_k=16",
            "teacher.mb_spec.max_tokens_per_mb=4096",
            "grpo.eps_clip_higher=0.28",
            "grpo.c_clip=3",
            "grpo.adv_std_norm=false",
            "student.path='1e-3'",  # strings that would read back as numbers, bools or null
            "teacher.path='yes'",
            "rollout.top_p=0.95",
            "student.dtype=bfloat16",
        ],
    )
    assert cfg.student.path == "1e-3" and cfg.teacher.path == "yes"
    path = tmp_path / "resolved.yaml"
    text = dump_config(cfg, path)
    assert path.read_text(encoding="utf-8") == text
    assert load_config(path) == cfg
    assert yaml.safe_load(text) == config_to_dict(cfg)  # plain YAML readers agree too


def test_round_trip_special_strings(tmp_path: Path) -> None:
    for value in ["null", "true", "on", "0.5", "1e3", "", "a: b", "#x"]:
        cfg = Config()
        cfg.student.path = value
        path = tmp_path / "cfg.yaml"
        dump_config(cfg, path)
        assert load_config(path).student.path == value, value


def test_dump_is_block_style_in_schema_order() -> None:
    text = dump_config(Config())
    top_keys = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert top_keys == [f.name for f in dataclasses.fields(Config)]
    assert top_keys[:5] == ["seed", "student", "rollout", "teacher", "grpo"]
    assert not re.search(r": \{", text)  # block style: no flow mappings
    assert "  mb_spec:\n    max_tokens_per_mb: 16384\n" in text
    assert list(config_to_dict(Config())["teacher"])[:3] == ["path", "dtype", "temperature"]


# --- command line ------------------------------------------------------------------------------


def test_cli_prints_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "teacher:\n  temperature: 2.0\n")
    assert main(["config", "--config", str(path), "teacher.kd_eps_clip=0.3"]) == 0
    out = capsys.readouterr().out
    resolved = write(tmp_path, out, "resolved.yaml")
    assert load_config(resolved) == load_config(path, ["teacher.kd_eps_clip=0.3"])
    assert "  temperature: 2.0\n" in out


def test_cli_error_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "teacher.distil_loss_weight=0.01"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kdrl: error: unknown key 'teacher.distil_loss_weight'")
    assert "did you mean 'teacher.distill_loss_weight'?" in captured.err


def test_cli_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--docs"]) == 0
    assert capsys.readouterr().out == render_markdown()
    assert main(["config", "--docs", "seed=2"]) == 2
    assert "--docs" in capsys.readouterr().err


def test_cli_needs_a_subcommand() -> None:
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2


def run_kdrl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdrl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_subprocess_success(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 5\n")
    result = run_kdrl("config", "--config", str(path), "rollout.n_samples=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["seed"] == 5 and data["rollout"]["n_samples"] == 8


def test_subprocess_bad_key(tmp_path: Path) -> None:
    path = write(tmp_path, "teacher:\n  distil_loss_weight: 0.01\n")
    result = run_kdrl("config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"kdrl: error: unknown key 'teacher.distil_loss_weight' in {path}; "
        "did you mean 'teacher.distill_loss_weight'?\n"
    )


# --- ranges of the training-loop blocks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.max_prompt_tokens=0"], "data.max_prompt_tokens must be >= 1, got 0"),
        (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
        (["optim.beta1=-0.1"], "optim.beta1 must be in \\[0, 1\\), got -0.1"),
        (["optim.beta1=1"], "optim.beta1 must be in \\[0, 1\\)"),
        (["optim.beta2=1"], "optim.beta2 must be in \\[0, 1\\)"),
        (["optim.eps=0"], "optim.eps must be > 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
        (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio must be in \\[0, 1\\]"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be in \\[0, 1\\]"),
        (["optim.max_grad_norm=-1"], "optim.max_grad_norm must be >= 0"),
        (["optim.lr=.nan"], "optim.lr must be finite"),
        (["train.batch_size=0"], "train.batch_size must be >= 1"),
        (["train.epochs=0"], "train.epochs must be >= 1"),
        (["train.max_steps=-1"], "train.max_steps must be >= 0"),
        (["train.ppo_n_minibatches=0"], "train.ppo_n_minibatches must be >= 1"),
        (["train.mb_spec.max_tokens_per_mb=0"], "train.mb_spec.max_tokens_per_mb must be >= 1"),
        (["train.save_every_steps=-1"], "train.save_every_steps must be >= 0"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1"),
        (["train.threads=-1"], "train.threads must be >= 0"),
        (["eval.every_steps=-1"], "eval.every_steps must be >= 0"),
        (["eval.max_prompts=-1"], "eval.max_prompts must be >= 0"),
        (["eval.temperature=-0.5"], "eval.temperature must be >= 0"),
        (
            ["teacher.distill_loss_weight_final=-0.1", "teacher.distill_decay_steps=10"],
            "teacher.distill_loss_weight_final must be >= 0 or null, got -0.1",
        ),
        (["teacher.distill_decay_steps=-1"], "teacher.distill_decay_steps must be >= 0"),
        (["teacher.kd_correct_weight=-0.5"], "teacher.kd_correct_weight must be >= 0"),
        (["teacher.kd_correct_weight=.inf"], "teacher.kd_correct_weight must be finite"),
        (["teacher.distill_loss_weight_final=.nan"], "distill_loss_weight_final must be finite"),
    ],
)
def test_validate_rejects_loop_block_ranges(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.ppo_n_minibatches=33"],  # default 8 prompts * 4 samples = 32 sequences
            "train.ppo_n_minibatches must be <= train.batch_size \\* rollout.n_samples = 32 "
            "\\(each minibatch needs at least one sequence\\), got 33",
        ),
        (
            ["train.batch_size=3", "rollout.n_samples=2", "train.ppo_n_minibatches=7"],
            "train.batch_size \\* rollout.n_samples = 6 .*, got 7",
        ),
        (
            ["teacher.distill_loss_weight_final=0"],
            "teacher.distill_decay_steps must be > 0 when teacher.distill_loss_weight_final is "
            "set \\(the schedule needs a length\\)",
        ),
        (
            ["teacher.kd_estimator=forward_kl", "teacher.kd_discount=0.5"],
            "teacher.kd_discount must be 0 when teacher.kd_estimator is 'forward_kl' "
            "\\(a full-distribution divergence, not a policy-gradient estimator\\), got 0.5",
        ),
        (
            ["teacher.kd_estimator=reverse_kl", "teacher.kd_discount=1"],
            "teacher.kd_discount must be 0 when teacher.kd_estimator is 'reverse_kl'",
        ),
        (
            ["teacher.kd_estimator=jsd", "teacher.kd_eps_clip=0.2"],
            "teacher.kd_eps_clip must be null when teacher.kd_estimator is 'jsd' .*got 0.2",
        ),
        (
            ["teacher.kd_estimator=reverse_kl", "teacher.kd_eps_clip=0.2"],
            "teacher.kd_eps_clip must be null when teacher.kd_estimator is 'reverse_kl'",
        ),
        (
            ["data.path=train.jsonl"],  # defaults: GRPO weight 1 and reward.fn none
            "reward.fn is 'none' but teacher.rl_loss_weight is 1.0: GRPO needs a task reward "
            ".*reward.fn=gsm8k.* or teacher.rl_loss_weight=0",
        ),
        (
            ["data.path=train.jsonl", "teacher.rl_loss_weight=1e-3", "reward.fn=none"],
            "reward.fn is 'none' but teacher.rl_loss_weight is 0.001",
        ),
        (
            ["data.path=train.jsonl", "reward.fn=gsm8k"],  # default distill weight, no teacher
            "teacher.path is empty but teacher.distill_loss_weight is 0.005",
        ),
    ],
)
def test_validate_rejects_combinations(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Solve:", "data.prompt_template must contain a field such as {prompt}"),
        ("", "data.prompt_template must contain a field"),
        ("{{prompt}}", "must contain a field"),  # escaped braces are literal text
        ("{prompt", "data.prompt_template is not a valid format string .*expected '}'"),
        ("Q} {prompt}", "data.prompt_template is not a valid format string .*Single '}'"),
        ("{}", "data.prompt_template fields are filled by name .*positional field {}"),
        ("{prompt} {0}", "positional field {0}"),
        ("{prompt!x}", "data.prompt_template has an unknown conversion '!x'"),
    ],
)
def test_validate_rejects_prompt_template(template: str, message: str) -> None:
    cfg = Config()
    cfg.data.prompt_template = template  # set in code: no YAML quoting in the way
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert repr(template) in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.max_prompt_tokens=1", "data.prompt_template='Q: {question}\n{prompt}'"],
        ["data.prompt_template='{{literal}} {prompt!r:>10}'"],
        ["data.path=train.jsonl", "reward.fn=gsm8k", "teacher.path=t"],
        ["data.path=train.jsonl", "teacher.rl_loss_weight=0", "teacher.path=t"],  # pure KD
        ["data.path=train.jsonl", "reward.fn=gsm8k", "teacher.distill_loss_weight=0"],  # pure RL
        [
            "optim.beta1=0",
            "optim.beta2=0.999999",
            "optim.weight_decay=0",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1",
            "optim.max_grad_norm=0",
        ],
        ["optim.min_lr_ratio=0", "optim.eps=1e-12", "optim.lr=1e-9"],
        ["train.ppo_n_minibatches=32"],  # one sequence per minibatch
        [
            "train.batch_size=1",
            "rollout.n_samples=1",
            "train.epochs=1",
            "train.max_steps=0",
            "train.save_every_steps=0",
            "train.keep_checkpoints=1",
            "train.threads=0",
            "train.mb_spec.max_tokens_per_mb=1",
        ],
        ["eval.temperature=0", "eval.every_steps=0", "eval.max_prompts=0"],
        ["teacher.distill_loss_weight_final=0", "teacher.distill_decay_steps=1"],
        ["teacher.distill_decay_steps=0", "teacher.kd_correct_weight=0"],
        ["teacher.kd_correct_weight=2.5"],  # above 1 up-weights correct answers: allowed
        ["teacher.kd_estimator=jsd", "teacher.top_k=8", "teacher.jsd_beta=0.1"],
        ["teacher.kd_estimator=forward_kl"],
        ["teacher.kd_estimator=pg", "teacher.kd_discount=1", "teacher.kd_eps_clip=0.2"],
    ],
)
def test_validate_accepts_loop_block_boundaries(overrides: list[str]) -> None:
    validate(load_config(None, overrides))


def test_every_numeric_field_has_a_range_or_is_deliberately_unbounded() -> None:
    from kdrl.config.validate import _RANGES

    unbounded = {"seed", "grpo.reward_scaling", "grpo.reward_bias", "reward.correct_threshold"}
    numeric = {
        info.key for info in iter_fields() if info.type in (int, float, int | None, float | None)
    }
    assert set(_RANGES) <= numeric  # a key typo in the table would also fail validate()
    assert numeric - set(_RANGES) == unbounded


def test_validate_and_config_error_still_import_from_the_loader() -> None:
    import importlib

    from kdrl.config import loader

    # `kdrl.config.validate` as an attribute is the function (the package re-exports it over
    # the submodule's name), so fetch the module itself.
    module = importlib.import_module("kdrl.config.validate")
    assert loader.validate is module.validate is validate
    assert loader.ConfigError is module.ConfigError is ConfigError


def test_a_value_yaml_reads_as_a_mapping_gets_a_hint_to_quote_it():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.prompt_template=Q: {question}"])
    assert str(err.value).endswith(
        "expected str, got {'Q': {'question': None}} (dict); YAML read the value as a mapping, "
        "not as text: put it in quotes (on the command line data.prompt_template='\"...\"')"
    )
    assert load_config(None, ['data.prompt_template="Q: {question}"']).data.prompt_template == (
        "Q: {question}"
    )
