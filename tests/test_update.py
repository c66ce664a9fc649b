"""The policy update: gradient accumulation over micro-batches, minibatches, schedules and
reward-guided masking."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.data import Prompt
from kdrl.kd import SAMPLED_KD_LOSSES
from kdrl.rollout import HFRollout
from kdrl.schedule import build_optimizer, distill_weight, lr_factor
from kdrl.teacher import LocalTeacher
from kdrl.update import LossSettings, UpdateBatch, policy_update


def test_lr_factor_warmup_and_decay():
    kw = dict(total=10, warmup=2, min_ratio=0.1)
    assert [lr_factor(s, kind="constant", **kw) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, kind="linear", **kw) == pytest.approx(1.0)
    assert lr_factor(9, kind="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(9, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(5, kind="cosine", **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(3 / 7 * torch.pi)).item())
    )


def test_distill_weight_schedule():
    assert distill_weight(7, start=0.5, final=None, decay_steps=10) == 0.5
    assert distill_weight(0, start=5e-3, final=1e-3, decay_steps=4) == 5e-3
    assert distill_weight(2, start=5e-3, final=1e-3, decay_steps=4) == pytest.approx(3e-3)
    assert distill_weight(9, start=5e-3, final=1e-3, decay_steps=4) == pytest.approx(1e-3)


def test_kd_weights_scale_each_token():
    g = torch.Generator().manual_seed(0)
    lp, teacher = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    w = torch.tensor([[0.0], [1.0], [0.5]]).expand(3, 5)
    for name, fn in SAMPLED_KD_LOSSES.items():
        rows = [slice(i, i + 1) for i in range(3)]
        full = [fn(lp[r], lp[r], teacher[r], mask[r], num_tokens=15.0)[0] for r in rows]
        got, _ = fn(lp, lp, teacher, mask, weights_BT=w, num_tokens=15.0)
        torch.testing.assert_close(got, full[1] + 0.5 * full[2], msg=name)


@pytest.fixture(scope="module")
def setup(tiny_pair):
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
    return student, UpdateBatch(batch, scores, adv, torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 1.0]))


def settings(estimator: str = "pg") -> LossSettings:
    return LossSettings(rl_loss_weight=0.5, distill_loss_weight=0.7, kd_estimator=estimator,
                        kd_discount=0.0, kd_eps_clip=None, jsd_beta=0.5, student_temperature=1.0,
                        eps_clip=0.2, eps_clip_higher=None, c_clip=None)  # fmt: skip


def one_update(student, data, estimator, *, n_minibatches, max_tokens, sgd=False):
    model = copy.deepcopy(student)
    opt, sched = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                                 total_steps=4, warmup_steps=0, schedule="constant",
                                 min_lr_ratio=0.0)  # fmt: skip
    if sgd:  # plain SGD: the update is the accumulated gradient itself (Adam amplifies noise)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    metrics = policy_update(model, opt, sched, data, settings(estimator),
                            n_minibatches=n_minibatches, max_tokens_per_mb=max_tokens,
                            max_grad_norm=1.0)  # fmt: skip
    return model, metrics


@pytest.mark.parametrize("estimator", ["pg", "k2", "reverse_kl", "jsd"])
def test_micro_batching_does_not_change_the_update(setup, estimator):
    student, data = setup
    a, ma = one_update(student, data, estimator, n_minibatches=1, max_tokens=10**6, sgd=True)
    b, mb = one_update(student, data, estimator, n_minibatches=1, max_tokens=1, sgd=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert ma["loss/total"] == pytest.approx(mb["loss/total"], rel=1e-5)
    assert any(
        not torch.equal(pa, ps) for pa, ps in zip(a.parameters(), student.parameters(), strict=True)
    )


def test_minibatches_take_several_optimizer_steps(setup):
    student, data = setup
    _, one = one_update(student, data, "pg", n_minibatches=1, max_tokens=10**6)
    _, three = one_update(student, data, "pg", n_minibatches=3, max_tokens=10**6)
    assert torch.isfinite(torch.tensor(list(three.values()))).all()
    assert three["grpo/ratio_mean"] != pytest.approx(1.0)  # later minibatches are off-policy
    assert one["grpo/ratio_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ppo_n_minibatches"):
        one_update(student, data, "pg", n_minibatches=7, max_tokens=10**6)


def test_window_take_is_a_view_for_consecutive_or_broadcast_rows():
    from kdrl.forward import Window

    x = torch.arange(5 * 6 * 3.0).reshape(5, 6, 3)
    window = Window(rows=[1, 2, 3], start=2, stop=5)
    got = window.take(x)
    assert torch.equal(got, x[[1, 2, 3], 2:5])
    assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view
    shuffled = Window(rows=[3, 1, 2], start=2, stop=5).take(x)
    assert torch.equal(shuffled, x[[3, 1, 2], 2:5])
    ids = torch.arange(3).expand(5, 6, 3)  # the full distribution's ids, broadcast
    assert torch.equal(Window(rows=[4, 0], start=1, stop=3).take(ids), ids[[4, 0], 1:3])
