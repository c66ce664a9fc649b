"""Non-finite losses and gradient norms: nothing is stepped on a nan/inf, the run stops with one
clear line (or, under `train.skip_nonfinite`, skips and counts the step), and what was already
written stays.

Real injections, no mocks: nan teacher log-probs (or a teacher with a nan weight) make the
distillation loss nan; a huge distillation weight keeps the loss finite (~1e30) while the sum
of squared gradients overflows, so only the gradient-norm check can catch it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.checkpoint import find_latest_checkpoint, load_trainer_state
from kdrl.config import ConfigError, load_config
from kdrl.data import Prompt
from kdrl.metrics import read_metrics
from kdrl.nonfinite import NonFiniteError
from kdrl.rollout import HFRollout
from kdrl.schedule import build_optimizer
from kdrl.teacher import LocalTeacher
from kdrl.tiny import char_tokenizer, save_tiny, tiny_causal_lm
from kdrl.train import train
from kdrl.update import LossSettings, UpdateBatch, policy_update

HUGE = 1e30
"""A distillation weight whose loss stays finite but whose gradient norm overflows float32."""


@pytest.fixture(scope="module")
def setup(tiny_pair):
    """The student and a finite update batch of 6 sequences (2 minibatches = rows 0-2, 3-5)."""
    student = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    prompts = [
        Prompt(i, t, tok(t)["input_ids"], None, False)
        for i, t in enumerate(["ab", "hello", "x y z"])
    ]
    torch.manual_seed(0)
    batch = HFRollout(student, tok, temperature=1.0, top_p=1.0, max_new_tokens=10).generate(
        prompts, n_samples=2
    )
    scores = LocalTeacher(teacher, temperature=1.0, max_tokens_per_mb=10**6, vocab=len(tok)).score(
        batch, top_k=5
    )
    adv = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(1))
    return student, UpdateBatch(batch, scores, adv, torch.ones(batch.num_sequences))


def settings(distill_loss_weight: float = 0.7) -> LossSettings:
    return LossSettings(rl_loss_weight=0.5, distill_loss_weight=distill_loss_weight,
                        kd_estimator="pg", kd_discount=0.0, kd_eps_clip=None, jsd_beta=0.5,
                        student_temperature=1.0, eps_clip=0.2, eps_clip_higher=None,
                        c_clip=None)  # fmt: skip


def nan_teacher(data: UpdateBatch, rows: list[int]) -> UpdateBatch:
    """``data`` with one nan teacher log-prob on a response token of each of ``rows``."""
    logprobs = data.teacher.logprobs_BT.clone()
    for r in rows:
        logprobs[r, data.rollout.response_mask_BT[r].nonzero()[0, 0]] = float("nan")
    return dataclasses.replace(
        data, teacher=dataclasses.replace(data.teacher, logprobs_BT=logprobs)
    )


def huge_kd_weight(data: UpdateBatch, rows: list[int]) -> UpdateBatch:
    weights = data.kd_weights_B.clone()
    weights[rows] = HUGE
    return dataclasses.replace(data, kd_weights_B=weights)


class Trainer:
    """A student copy with AdamW and a warmup schedule (so the LR moves with every step)."""

    def __init__(self, student):
        self.model = copy.deepcopy(student)
        self.opt, self.sched = build_optimizer(
            self.model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, total_steps=8,
            warmup_steps=4, schedule="linear", min_lr_ratio=0.0,
        )  # fmt: skip

    def update(self, data, n_minibatches=1, s=None, **kw):
        """One update; a budget of 20 tokens makes each sequence its own micro-batch."""
        return policy_update(self.model, self.opt, self.sched, data, s or settings(),
                             n_minibatches=n_minibatches, max_tokens_per_mb=20,
                             max_grad_norm=1.0, **kw)  # fmt: skip

    def state(self) -> dict:
        """Everything a step may change, copied: weights, grads, AdamW state, schedule."""
        return copy.deepcopy({
            "params": dict(self.model.named_parameters()),
            "grads": {n: p.grad for n, p in self.model.named_parameters()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "lr": [g["lr"] for g in self.opt.param_groups],
        })  # fmt: skip


def assert_same(a, b, where="state"):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    ("inject", "metric"), [(nan_teacher, "loss/kd"), (huge_kd_weight, "optim/grad_norm")]
)
def test_a_nonfinite_update_raises_and_touches_nothing(setup, inject, metric):
    student, data = setup
    t = Trainer(student)
    t.update(data)  # a finite step first: AdamW state and schedule exist and have moved
    before = t.state()
    assert (
        int(before["optimizer"]["state"][0]["step"]) == 1 and before["scheduler"]["last_epoch"] == 1
    )
    with pytest.raises(NonFiniteError, match=f"non-finite {metric} = (nan|inf)") as err:
        t.update(inject(data, [4]))  # one of six micro-batches: the others run their backward
    assert err.value.found.metric == metric
    assert_same(before, t.state())
    assert all(p.grad is None for p in t.model.parameters())
    t.update(data)  # and the next finite update still steps
    assert t.sched.last_epoch == 2


@pytest.mark.parametrize("inject", [nan_teacher, huge_kd_weight])
def test_minibatch_two_leaves_exactly_the_state_minibatch_one_stepped_to(setup, inject):
    """The guarantee is per optimizer step: minibatch 1's step stands, minibatch 2 adds
    nothing. The reference is a clean update's state right after its first step."""
    student, data = setup
    clean = Trainer(student)
    after_first = []  # weights and AdamW state right after the clean update's first step

    def capture(*_):
        if not after_first:
            after_first.append(copy.deepcopy((dict(clean.model.named_parameters()),
                                              clean.opt.state_dict()["state"])))  # fmt: skip

    clean.opt.register_step_post_hook(capture)
    clean.update(data, n_minibatches=2)
    bad = Trainer(student)
    with pytest.raises(NonFiniteError, match="in minibatch 2 of 2") as err:
        bad.update(inject(data, [4]), n_minibatches=2)
    assert err.value.found.minibatch == 2
    state = bad.state()
    assert_same(after_first[0][0], state["params"], "params")
    assert_same(after_first[0][1], state["optimizer"]["state"], "optimizer")
    one_schedule_step = Trainer(student)
    one_schedule_step.opt.step()  # no gradients: a no-op, in the order the scheduler expects
    one_schedule_step.sched.step()
    assert_same(one_schedule_step.sched.state_dict(), state["scheduler"], "scheduler")
    assert_same(one_schedule_step.opt.state_dict()["param_groups"],
                state["optimizer"]["param_groups"], "param_groups")  # fmt: skip
    assert all(p.grad is None for p in bad.model.parameters())
    # Non-finite in minibatch 1: nothing at all moved.
    fresh = Trainer(student)
    initial = fresh.state()
    with pytest.raises(NonFiniteError, match="in minibatch 1 of 2"):
        fresh.update(inject(data, [1]), n_minibatches=2)
    assert_same(initial, fresh.state())


def test_skipping_drops_the_bad_minibatch_and_steps_the_rest(setup):
    student, data = setup
    t = Trainer(student)
    found = []
    metrics = t.update(nan_teacher(data, [0]), n_minibatches=2, on_nonfinite=found.append)
    assert [(f.metric, f.minibatch) for f in found] == [("loss/kd", 1)]
    assert t.sched.last_epoch == 1 and int(t.opt.state_dict()["state"][0]["step"]) == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert any(
        not torch.equal(a, b)
        for a, b in zip(t.model.parameters(), student.parameters(), strict=True)
    )
    # Every minibatch skipped: no step at all, and no loss metrics to report.
    t2 = Trainer(student)
    initial = t2.state()
    metrics = t2.update(data, n_minibatches=2, s=settings(HUGE), on_nonfinite=found.append)
    assert [f.metric for f in found[1:]] == ["optim/grad_norm"] * 2
    assert "loss/total" not in metrics
    assert_same(initial, t2.state())


# --- real training runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(pair, prompts_file, out: Path, *extra: str) -> list[str]:
    student, teacher = pair
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"data.path={prompts_file}",
        "data.answer_field=answer", "reward.fn=exact_match", "data.chat_template=false",
        f"train.output_dir={out}", "train.batch_size=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=8", "optim.lr=1e-3", "train.tensorboard=false", *extra,
    ]  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# Training step 1 distils with weight 0.5, every later step with 1e30: finite, then inf norms.
FROM_STEP_2 = ("teacher.distill_loss_weight=0.5", f"teacher.distill_loss_weight_final={HUGE}",
               "teacher.distill_decay_steps=1")  # fmt: skip
# Training step 1 with 1e30, later steps with 0.5 (in float64 1e30 + (0.5 - 1e30) rounds to 0:
# later steps may not distil at all, so their GRPO term must move the weights: see `spread`).
ONLY_STEP_1 = (f"teacher.distill_loss_weight={HUGE}", "teacher.distill_loss_weight_final=0.5",
               "teacher.distill_decay_steps=1", "reward.fn=test_nonfinite:spread")  # fmt: skip


def spread(completion: str, answer: str | None) -> float:
    """A reward that differs between samples of one prompt, so GRPO advantages are not 0."""
    return float(sum(map(ord, completion)) % 10)


def test_cli_stops_in_one_line_keeps_earlier_steps_and_resumes_skipping(
    tiny_pair, prompts_file, tmp_path, capsys
):
    from kdrl.cli import main

    out = tmp_path / "run"
    args = base(tiny_pair, prompts_file, out, "train.max_steps=3", "train.save_every_steps=1",
                *FROM_STEP_2)  # fmt: skip
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdrl: error: step 2: non-finite optim/grad_norm = inf;"), last
    assert "train.skip_nonfinite=true" in last and "Traceback" not in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    step1 = find_latest_checkpoint(out)
    assert step1 is not None and step1.name == "step-00000001"

    # Resumed with skipping on: step 2 is skipped (weights as at step 1), step 3 exceeds the limit.
    resumed = load_config(None, [*args, "train.skip_nonfinite=true", "train.max_skipped_steps=1"])
    stop = r"^step 3: non-finite optim/grad_norm = inf; 2 optimizer steps skipped, more than "
    with pytest.raises(NonFiniteError, match=stop + r"train\.max_skipped_steps=1"):
        train(resumed, resume=True)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["optim/skipped_steps"] == 1
    assert "loss/total" in rows[0] and "loss/total" not in rows[1]
    step2 = find_latest_checkpoint(out)
    assert step2.name == "step-00000002"
    assert load_trainer_state(step2)["skipped_steps"] == 1
    w1, w2 = weights(step1), weights(step2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.fixture(scope="module")
def nan_teacher_pair(tiny_pair, tmp_path_factory):
    """The student, and a teacher with one nan weight: every log-prob it gives is nan."""
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=48, layers=3, seed=2)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    return tiny_pair[0], save_tiny(tmp_path_factory.mktemp("nan") / "teacher", tok, model)


def test_a_nan_teacher_stops_at_step_one_naming_the_loss_term(
    nan_teacher_pair, prompts_file, tmp_path
):
    cfg = load_config(
        None, base(nan_teacher_pair, prompts_file, tmp_path / "r", "train.max_steps=2")
    )
    with pytest.raises(NonFiniteError, match=r"^step 1: non-finite loss/kd = nan;"):
        train(cfg)


def test_skipped_steps_are_counted_logged_and_stop_past_the_limit(
    nan_teacher_pair, prompts_file, tmp_path, caplog
):
    out = tmp_path / "r"
    skip = ("train.max_steps=5", "train.skip_nonfinite=true", "train.max_skipped_steps=2")
    cfg = load_config(None, base(nan_teacher_pair, prompts_file, out, *skip))
    limit = r"^step 3: non-finite loss/kd = nan; 3 optimizer steps skipped, more than train\.max"
    with (
        caplog.at_level(logging.WARNING, logger="kdrl"),
        pytest.raises(NonFiniteError, match=limit),
    ):
        train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], r["optim/skipped_steps"]) for r in rows] == [(1, 1.0), (2, 2.0)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("step 2: non-finite loss/kd = nan; optimizer step skipped (2 so far")
               for m in warnings), warnings  # fmt: skip


def test_later_finite_steps_proceed_and_resume_keeps_the_counter(tiny_pair, prompts_file, tmp_path):
    common = ("train.skip_nonfinite=true", *ONLY_STEP_1)
    a = tmp_path / "a"
    straight = train(load_config(None, base(tiny_pair, prompts_file, a, "train.max_steps=4",
                                            "train.save_every_steps=1", "train.keep_checkpoints=4",
                                            *common)))  # fmt: skip
    rows = read_metrics(a / "metrics.jsonl")
    assert [r["optim/skipped_steps"] for r in rows] == [1, 1, 1, 1]
    assert "loss/total" not in rows[0] and all("loss/total" in r for r in rows[1:])
    start, step1 = weights(tiny_pair[0]), weights(a / "checkpoints" / "step-00000001")
    assert all(torch.equal(start[k], step1[k]) for k in start)  # the skipped step moved nothing
    assert any(not torch.equal(start[k], v) for k, v in weights(straight).items())

    b = tmp_path / "b"
    # Stopped after the skipped step: the checkpoint holds no optimizer state yet.
    train(load_config(None, base(tiny_pair, prompts_file, b, "train.max_steps=1", *common)))
    state = load_trainer_state(b / "checkpoints" / "step-00000001")
    assert state["skipped_steps"] == 1 and state["optimizer"] is None
    resumed = train(
        load_config(None, base(tiny_pair, prompts_file, b, "train.max_steps=4", *common)),
        resume=True,
    )
    assert [r["optim/skipped_steps"] for r in read_metrics(b / "metrics.jsonl")] == [1, 1, 1, 1]
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_max_skipped_steps_is_validated():
    with pytest.raises(ConfigError, match=r"train.max_skipped_steps must be >= 1, got 0"):
        load_config(None, ["train.max_skipped_steps=0"])


# --- data parallelism ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seven_teacher_pair(tiny_pair, tmp_path_factory):
    """The student, and a teacher whose embedding of "7" is nan: a sequence holding a 7 (in its
    prompt, or sampled) has nan teacher log-probs after it, so only some minibatches of some
    ranks have a non-finite loss."""
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=48, layers=3, seed=2)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("7")] = float("nan")
    return tiny_pair[0], save_tiny(tmp_path_factory.mktemp("seven") / "teacher", tok, model)


@pytest.mark.slow
# FSDP2 only in CI (40 s a run): the skip decision is one all-reduce in policy_update, the same
# for DDP; `-k ddp` with "ddp" added here runs the DDP variant.
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_two_ranks_skip_the_steps_one_process_skips(
    seven_teacher_pair, prompts_file, tmp_path, parallel
):
    """Every rank must take the same decision (the loss may be nan on one rank only) and run
    the same collectives; the run then matches one process on the same global batch."""
    from test_distributed import CURVE, assert_curves_close, assert_weights_close, launch, overrides

    data = (prompts_file, prompts_file)
    skip = ("train.skip_nonfinite=true", "train.max_skipped_steps=100", 'eval.path=""')
    launch(overrides(seven_teacher_pair, data, tmp_path / "one", *skip), ranks=1)
    launch(overrides(seven_teacher_pair, data, tmp_path / "two", *skip,
                     f"train.parallel={parallel}"), ranks=2)  # fmt: skip
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    skipped = [r["optim/skipped_steps"] for r in one]
    assert 0 < skipped[-1] < 2 * len(one), skipped  # some minibatches skipped, some stepped
    assert [r["optim/skipped_steps"] for r in two] == skipped
    assert all(a.keys() == b.keys() for a, b in zip(one, two, strict=True))
    # The drift of these runs through rounding alone (scripts/measure_dp_rounding.py, as in
    # tests/test_distributed.py): at most 4.4e-4 of a metric's scale (rollout/reverse_kl, step 4,
    # ATEN_CPU_CAPABILITY=avx2) and 1.8e-5 on the weights; 10x those bounds.
    assert_curves_close(one, two, CURVE, 10 * 4.4e-4)
    assert_weights_close(
        weights(tmp_path / "one" / "checkpoints" / "step-00000004"),
        weights(tmp_path / "two" / "checkpoints" / "step-00000004"),
        10 * 1.8e-5,
    )
