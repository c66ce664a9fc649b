"""Range and combination checks on a `Config`: what the field types cannot express.

`load_config` runs `validate` after every override is applied, so each rule sees final values.
Single-field ranges live in one table; rules that tie fields together are small functions
below it. Every failure is a `ConfigError` naming the dotted key and the value it got.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any

from kdrl.config.docs import iter_fields
from kdrl.config.schema import Config


class ConfigError(ValueError):
    """A mistake in a config file or override: the CLI prints it without a traceback."""


Rule = tuple[Callable[[Any], bool], str]
"""(test of a value, the requirement as the error message states it)."""


def _ge(bound: int) -> Rule:
    return (lambda v: v >= bound), f">= {bound}"


def _gt(bound: int) -> Rule:
    return (lambda v: v > bound), f"> {bound}"


def _within(lo: int, hi: int, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    return ok, f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"


def _or_null(rule: Rule) -> Rule:
    test, requirement = rule
    return (lambda v: v is None or test(v)), f"{requirement} or null"


_RANGES: dict[str, Rule] = {
    "rollout.n_samples": _ge(1),
    "rollout.temperature": _gt(0),
    "rollout.top_p": _within(0, 1, open_lo=True),
    "rollout.max_new_tokens": _ge(1),
    "teacher.temperature": _gt(0),
    "teacher.rl_loss_weight": _ge(0),
    "teacher.distill_loss_weight": _ge(0),
    "teacher.distill_loss_weight_final": _or_null(_ge(0)),
    "teacher.distill_decay_steps": _ge(0),
    "teacher.kd_correct_weight": _ge(0),
    "teacher.kd_discount": _within(0, 1),
    "teacher.kd_eps_clip": _or_null(_gt(0)),
    "teacher.jsd_beta": _within(0, 1),
    "teacher.top_k": _or_null(_ge(1)),
    "teacher.mb_spec.max_tokens_per_mb": _ge(1),
    "teacher.timeout_s": _gt(0),
    "teacher.max_retries": _ge(0),
    "rollout.vllm.gpu_memory_utilization": _within(0, 1, open_lo=True),
    "rollout.vllm.cpu_kvcache_gb": _gt(0),
    "rollout.vllm.max_model_len": _ge(0),
    "grpo.eps_clip": _gt(0),
    "grpo.eps_clip_higher": _or_null(_gt(0)),
    "grpo.c_clip": _or_null(_gt(1)),
    "data.max_prompt_tokens": _ge(1),
    "optim.lr": _gt(0),
    "optim.weight_decay": _ge(0),
    "optim.beta1": _within(0, 1, open_hi=True),
    "optim.beta2": _within(0, 1, open_hi=True),
    "optim.eps": _gt(0),
    "optim.warmup_steps": _ge(0),
    "optim.min_lr_ratio": _within(0, 1),
    "optim.max_grad_norm": _ge(0),
    "train.batch_size": _ge(1),
    "train.epochs": _ge(1),
    "train.max_steps": _ge(0),
    "train.ppo_n_minibatches": _ge(1),
    "train.mb_spec.max_tokens_per_mb": _ge(1),
    "train.save_every_steps": _ge(0),
    "train.keep_checkpoints": _ge(1),
    "train.threads": _ge(0),
    "train.max_skipped_steps": _ge(1),
    "train.guard_patience_steps": _ge(0),
    "train.guard_min_eos_frac": _or_null(_within(0, 1)),
    "train.guard_max_repeat_frac": _or_null(_within(0, 1)),
    "eval.every_steps": _ge(0),
    "eval.max_prompts": _ge(0),
    "eval.temperature": _ge(0),
}

# Estimators whose loss is a divergence between whole next-token distributions: no sampled
# return to discount and no importance ratio to clip, so those knobs would silently do nothing.
_FULL_DISTRIBUTION = ("forward_kl", "reverse_kl", "jsd")
_PER_TOKEN = "its per-token form has no discount"
_NOT_PG = "a full-distribution divergence, not a policy-gradient estimator"
_NO_DISCOUNT_REASON = {"k2": _PER_TOKEN, "seed_k1": _PER_TOKEN} | dict.fromkeys(
    _FULL_DISTRIBUTION, _NOT_PG
)


def validate(cfg: Config) -> None:
    """Check what types cannot express (ranges, combinations); errors name the key."""
    for info in iter_fields():
        if info.type is float or info.type == float | None:
            value = _get(cfg, info.key)
            _check(info.key, value, value is None or math.isfinite(value), "finite")
    for key, (test, requirement) in _RANGES.items():
        value = _get(cfg, key)
        _check(key, value, test(value), requirement)
    _check_loss_terms(cfg)
    _check_estimator(cfg)
    _check_minibatches(cfg)
    _check_prompt_template(cfg.data.prompt_template)


def _check_loss_terms(cfg: Config) -> None:
    t = cfg.teacher
    if t.rl_loss_weight == 0 and t.distill_loss_weight == 0:
        raise ConfigError(
            "teacher.rl_loss_weight and teacher.distill_loss_weight are both 0: nothing to train"
        )
    # Only once data.path names prompts: the bare defaults (GRPO weight 1, no reward) describe
    # no run, and `kdrl config` must still print them.
    if cfg.data.path and t.rl_loss_weight > 0 and cfg.reward.fn == "none":
        raise ConfigError(
            f"reward.fn is 'none' but teacher.rl_loss_weight is {t.rl_loss_weight!r}: GRPO needs "
            "a task reward (every advantage would be 0); set reward.fn (e.g. reward.fn=gsm8k) "
            "or teacher.rl_loss_weight=0 for pure distillation"
        )
    if t.backend != "local" and not t.url:
        raise ConfigError(
            f"teacher.url is empty but teacher.backend is {t.backend!r}: give the server's base "
            "URL (e.g. teacher.url=http://127.0.0.1:8000), or teacher.backend=local"
        )
    if t.backend == "openai" and not t.path:
        raise ConfigError(
            "teacher.path is empty but teacher.backend is 'openai': give the model name the "
            "server serves (the `model` field of its requests)"
        )
    if t.backend == "local" and t.url:
        raise ConfigError(
            f"teacher.url is {t.url!r} but teacher.backend is 'local': set teacher.backend=http "
            "(a kdrl serve-teacher server) or teacher.backend=openai (vllm serve)"
        )
    if cfg.data.path and t.distill_loss_weight > 0 and not has_teacher(cfg):
        raise ConfigError(
            f"teacher.path is empty but teacher.distill_loss_weight is {t.distill_loss_weight!r}: "
            "distillation needs a teacher; set teacher.path, or teacher.distill_loss_weight=0 "
            "for pure GRPO"
        )
    if t.distill_loss_weight_final is not None and t.distill_decay_steps == 0:
        raise ConfigError(
            "teacher.distill_decay_steps must be > 0 when teacher.distill_loss_weight_final is "
            f"set (the schedule needs a length), got 0 with a final weight of "
            f"{t.distill_loss_weight_final!r}"
        )


def has_teacher(cfg: Config) -> bool:
    """A teacher is configured: a model to load, or a server to ask."""
    return bool(cfg.teacher.path) or cfg.teacher.backend != "local"


def _check_estimator(cfg: Config) -> None:
    t = cfg.teacher
    if t.backend == "openai" and t.kd_estimator in _FULL_DISTRIBUTION:
        raise ConfigError(
            f"teacher.kd_estimator {t.kd_estimator!r} needs the teacher's distribution, which "
            "teacher.backend=openai does not give (its prompt log-probs are of the sampled "
            "tokens); use pg, k2 or seed_k1, or teacher.backend=http"
        )
    reason = _NO_DISCOUNT_REASON.get(t.kd_estimator)
    if reason and t.kd_discount != 0:
        raise ConfigError(
            f"teacher.kd_discount must be 0 when teacher.kd_estimator is {t.kd_estimator!r} "
            f"({reason}), got {t.kd_discount!r}"
        )
    if t.kd_estimator in _FULL_DISTRIBUTION and t.kd_eps_clip is not None:
        raise ConfigError(
            f"teacher.kd_eps_clip must be null when teacher.kd_estimator is {t.kd_estimator!r} "
            f"(a full-distribution divergence has no importance ratio to clip), "
            f"got {t.kd_eps_clip!r}"
        )


def _check_minibatches(cfg: Config) -> None:
    sequences = cfg.train.batch_size * cfg.rollout.n_samples
    n = cfg.train.ppo_n_minibatches
    requirement = (
        f"<= train.batch_size * rollout.n_samples = {sequences} "
        "(each minibatch needs at least one sequence)"
    )
    _check("train.ppo_n_minibatches", n, n <= sequences, requirement)


def _check_prompt_template(template: str) -> None:
    key = "data.prompt_template"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(
            f"{key} is not a valid format string ({err}); write a literal brace as '{{{{' or "
            f"'}}}}', got {template!r}"
        ) from err
    fields = [(name, conversion) for _, name, _, conversion in parts if name is not None]
    if not fields:
        raise ConfigError(
            f"{key} must contain a field such as {{prompt}} where the prompt text goes, "
            f"got {template!r}"
        )
    for name, conversion in fields:
        # The template is filled by keyword, so `{}` / `{0}` would fail on the first prompt.
        if not name.strip() or name[0].isdigit():
            raise ConfigError(
                f"{key} fields are filled by name (e.g. {{prompt}}), got the positional field "
                f"{{{name}}} in {template!r}"
            )
        if conversion not in (None, "r", "s", "a"):
            raise ConfigError(
                f"{key} has an unknown conversion '!{conversion}' (use !r, !s or !a), "
                f"got {template!r}"
            )


def _check(key: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
