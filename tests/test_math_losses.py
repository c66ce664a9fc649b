"""GRPO and the joint loss: closed-form values, micro-batch invariance, masking, inf safety."""

from __future__ import annotations

import math

import pytest
import torch

from kdrl.grpo import group_advantages, ppo_policy_loss, sequence_to_tokens
from kdrl.kd import SAMPLED_KD_LOSSES, reward_to_go
from kdrl.loss import kdrl_loss
from kdrl.masking import masked_sum

B, T = 6, 8


def test_group_advantages_closed_form():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(r, std_norm=True, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert (adv[1] == 0).all()  # identical rewards carry no signal
    mean_only = group_advantages(r, reward_scaling=2.0, reward_bias=1.0, std_norm=False)
    torch.testing.assert_close(mean_only[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    single = group_advantages(torch.tensor([[3.0]]), std_norm=True)
    assert single.item() == 0.0 and not torch.isnan(single).any()
    with pytest.raises(ValueError, match="prompts, samples"):
        group_advantages(torch.zeros(4))


def test_ppo_loss_closed_form_clip_and_dual_clip():
    mask = torch.ones(1, 4, dtype=torch.bool)
    ratio = torch.tensor([[0.5, 1.5, 0.5, 3.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    lp = ratio.log()
    # eps 0.2: token 0 (A>0, rho<1-eps) unclipped -0.5; token 1 clipped -1.2;
    # token 2 (A<0, rho<1-eps) clipped 0.8; token 3 (A<0, rho=3) unclipped 3.0.
    loss, m = ppo_policy_loss(lp, old, adv, mask, eps_clip=0.2, num_tokens=4)
    assert loss.item() == pytest.approx((-0.5 - 1.2 + 0.8 + 3.0) / 4)
    assert m["grpo/clip_frac"] == pytest.approx(2 / 4)
    loss_hi, _ = ppo_policy_loss(
        lp, old, adv, mask, eps_clip=0.2, eps_clip_higher=0.6, num_tokens=4
    )
    assert loss_hi.item() == pytest.approx((-0.5 - 1.5 + 0.8 + 3.0) / 4)
    loss_dual, _ = ppo_policy_loss(lp, old, adv, mask, eps_clip=0.2, c_clip=2.0, num_tokens=4)
    assert loss_dual.item() == pytest.approx((-0.5 - 1.2 + 0.8 + 2.0) / 4)
    with pytest.raises(ValueError, match="c_clip"):
        ppo_policy_loss(lp, old, adv, mask, eps_clip=0.2, c_clip=1.0, num_tokens=4)
    with pytest.raises(ValueError, match="num_tokens"):
        ppo_policy_loss(lp, old, adv, mask, eps_clip=0.2, num_tokens=0)


@pytest.mark.parametrize("discount", [0.0, 0.3, 1.0])
def test_reward_to_go_matches_python_loop(discount):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    got = reward_to_go(r, mask, discount=discount)
    for b in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                acc = r[b, t].item() + discount * acc
                assert got[b, t].item() == pytest.approx(acc, abs=1e-12)
    with pytest.raises(ValueError, match="discount"):
        reward_to_go(r, mask, discount=1.5)


def batch(seed: int = 0, dtype=torch.float64):
    """Left-padded prompts and right-padded responses: mask is true on response tokens only."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 11, generator=g, dtype=dtype)
    tokens = torch.randint(0, 11, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 8), (3, 5), (1, 2), (4, 8), (2, 7), (5, 6)]):
        mask[b, start:end] = True
    teacher = torch.randn(B, T, generator=g, dtype=dtype).clamp(max=-0.1)
    behav = torch.randn(B, T, generator=g, dtype=dtype) * 0.1
    adv = torch.randn(B, generator=g, dtype=dtype)
    return logits, tokens, mask, teacher, behav, adv


def joint_loss(x, tokens, mask, teacher, behav_shift, adv, rows, estimator, discount, n_tok):
    lp = x.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return kdrl_loss(
        lp[rows], (lp.detach() + behav_shift)[rows], teacher[rows],
        sequence_to_tokens(adv[rows], mask[rows]), mask[rows],
        rl_loss_weight=0.7, distill_loss_weight=0.4, kd_estimator=estimator,
        kd_discount=discount, kd_eps_clip=0.2, eps_clip=0.2, c_clip=3.0, num_tokens=n_tok,
    )[0]  # fmt: skip


@pytest.mark.parametrize(
    ("estimator", "discount"), [("pg", 0.0), ("pg", 0.5), ("k2", 0.0), ("seed_k1", 0.0)]
)
def test_micro_batches_add_up_to_the_batch(estimator, discount):
    logits, tokens, mask, teacher, behav, adv = batch()
    n_tok = float(mask.sum())
    x = logits.clone().requires_grad_(True)
    full = joint_loss(x, tokens, mask, teacher, behav, adv, slice(None), estimator, discount, n_tok)
    (g_full,) = torch.autograd.grad(full, x)
    y = logits.clone().requires_grad_(True)
    parts = [joint_loss(y, tokens, mask, teacher, behav, adv, rows, estimator, discount, n_tok)
             for rows in (slice(0, 1), slice(1, 4), slice(4, 6))]  # fmt: skip
    (g_parts,) = torch.autograd.grad(sum(parts), y)
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-12, atol=1e-14)
    assert g_full.abs().sum() > 0


@pytest.mark.parametrize("estimator", sorted(SAMPLED_KD_LOSSES))
def test_masked_positions_get_zero_gradient_and_inf_teacher_is_harmless(estimator):
    logits, tokens, mask, teacher, behav, adv = batch(seed=1)
    teacher = teacher.masked_fill(~mask, -math.inf)  # prompt/padding scored as -inf
    behav = behav.masked_fill(~mask, math.nan)
    x = logits.clone().requires_grad_(True)
    loss = joint_loss(x, tokens, mask, teacher, behav, adv, slice(None), estimator, 0.0, 9.0)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0


def test_padding_width_does_not_change_loss_or_gradient():
    logits, tokens, mask, teacher, behav, adv = batch(seed=2)
    wide = lambda z, fill: torch.cat([z, torch.full_like(z, fill)], dim=1)  # noqa: E731
    x = logits.clone().requires_grad_(True)
    narrow_loss = joint_loss(x, tokens, mask, teacher, behav, adv, slice(None), "pg", 1.0, 20.0)
    (g_narrow,) = torch.autograd.grad(narrow_loss, x)
    y = logits.clone().requires_grad_(True)
    y2 = torch.cat([y, torch.zeros_like(y)], dim=1)
    mask2 = torch.cat([mask, torch.zeros_like(mask)], dim=1)
    wide_loss = joint_loss(
        y2, wide(tokens, 0), mask2, wide(teacher, -math.inf), wide(behav, 0.0), adv,
        slice(None), "pg", 1.0, 20.0,
    )  # fmt: skip
    (g_wide,) = torch.autograd.grad(wide_loss, y)
    torch.testing.assert_close(wide_loss, narrow_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_wide, g_narrow, rtol=1e-12, atol=1e-14)


def test_teacher_gets_no_gradient_and_reward_is_detached():
    logits, tokens, mask, teacher, _, _ = batch(seed=3)
    t = teacher.clone().requires_grad_(True)
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).requires_grad_(True)
    for name, fn in SAMPLED_KD_LOSSES.items():
        loss, _ = fn(lp, lp.detach(), t, mask, num_tokens=10.0)
        assert loss.grad_fn is not None, name
        g_t = torch.autograd.grad(loss, t, allow_unused=True)[0]
        assert g_t is None or (g_t == 0).all(), name


def test_on_policy_pg_gradient_is_reinforce_form():
    # d loss / d logp_t = -(log p_T - log q)_t / N exactly (ratio = 1, no discount): the
    # detached per-token reward, not its derivative (torchforge #527 class of bug).
    logits, tokens, mask, teacher, _, _ = batch(seed=4)
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).requires_grad_(True)
    loss, _ = SAMPLED_KD_LOSSES["pg"](lp, lp.detach(), teacher, mask, num_tokens=7.0)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, torch.where(mask, -(teacher - lp.detach()) / 7.0, 0.0))


def test_pure_kd_and_pure_rl_weights():
    logits, tokens, mask, teacher, _, adv = batch(seed=5)
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    adv_bt = sequence_to_tokens(adv, mask)
    common = dict(kd_estimator="pg", num_tokens=10.0)
    kd_only, m = kdrl_loss(
        lp, lp, teacher, None, mask, rl_loss_weight=0.0, distill_loss_weight=1.0, **common
    )
    assert "loss/grpo" not in m and m["loss/kd"] == pytest.approx(kd_only.item())
    rl_only, m = kdrl_loss(
        lp, lp, None, adv_bt, mask, rl_loss_weight=1.0, distill_loss_weight=0.0, **common
    )
    assert "loss/kd" not in m and m["loss/grpo"] == pytest.approx(rl_only.item())
    both, _ = kdrl_loss(
        lp, lp, teacher, adv_bt, mask, rl_loss_weight=2.0, distill_loss_weight=0.5, **common
    )
    assert both.item() == pytest.approx(2.0 * rl_only.item() + 0.5 * kd_only.item())
    with pytest.raises(ValueError, match="both 0"):
        kdrl_loss(
            lp, lp, teacher, adv_bt, mask, rl_loss_weight=0.0, distill_loss_weight=0.0, **common
        )
    with pytest.raises(ValueError, match="unknown kd_estimator"):
        kdrl_loss(lp, lp, teacher, adv_bt, mask, rl_loss_weight=1.0, distill_loss_weight=1.0,
                  kd_estimator="k3", num_tokens=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="discount"):
        SAMPLED_KD_LOSSES["k2"](lp, lp, teacher, mask, discount=0.5, num_tokens=1.0)


def test_reverse_kl_metric_is_the_k1_mean():
    logits, tokens, mask, teacher, _, _ = batch(seed=6)
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    _, m = SAMPLED_KD_LOSSES["pg"](lp, lp, teacher, mask, num_tokens=float(mask.sum()))
    assert m["kd/reverse_kl"] == pytest.approx(((lp - teacher)[mask]).mean().item())
    assert m["kd/reverse_kl_k3"] >= 0


def test_masked_sum_ignores_non_finite_padding_in_value_and_gradient():
    x = torch.tensor([[1.0, math.inf, 2.0], [math.nan, 3.0, -math.inf]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    total = masked_sum(x * 2.0, mask)
    (g,) = torch.autograd.grad(total, x)
    assert total.item() == 12.0
    assert torch.equal(g, torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]]))
