"""Every sampled-token estimator against exact answers on a fully enumerable model.

Two kinds of check: (1) the *exact* expectation of each estimator's gradient, summed over all
40 sequences with their probabilities, equals the exact gradient of the divergence it claims to
estimate (to float64 precision); (2) the Monte-Carlo mean over >= 1e5 vectorised samples, as the
training loop would compute it (token-mean over a batch), matches within sampling error.
"""

from __future__ import annotations

import pytest
import torch

import tabular as tab
from kdrl.grpo import group_advantages, sequence_to_tokens
from kdrl.kd import SAMPLED_KD_LOSSES
from kdrl.loss import kdrl_loss


@pytest.fixture(scope="module")
def models() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(tab.N_STATES, tab.V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(tab.N_STATES, tab.V, generator=g, dtype=torch.float64)
    return student, teacher


def grad_of(fn, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_enumeration_is_a_distribution(models):
    student, _ = models
    batch = tab.enumerate_all()
    lq_X = (tab.token_logprobs(student, batch) * batch.mask_BT).sum(1)
    assert len(lq_X) == 40
    assert lq_X.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # Sampling frequencies agree with enumerated probabilities.
    sampled = tab.sample(student, 200_000, torch.Generator().manual_seed(1))
    key = lambda t: (t * torch.tensor([16, 4, 1])).sum(-1)  # noqa: E731
    counts = torch.bincount(key(sampled.tokens_BT), minlength=64).double() / 200_000
    expect = torch.zeros(64, dtype=torch.float64).index_add_(0, key(batch.tokens_BT), lq_X.exp())
    assert (counts - expect).abs().max().item() < 0.01


def expected_estimator_grad(models, estimator: str, discount: float) -> torch.Tensor:
    """``sum_x q(x) grad l(x)``: the estimator's exact expected gradient (per-sequence sums)."""
    student, teacher = models
    batch = tab.enumerate_all()
    loss_fn = SAMPLED_KD_LOSSES[estimator]

    def weighted(theta):
        lq_BT = tab.token_logprobs(theta, batch)
        lp_BT = tab.token_logprobs(teacher, batch)
        q_X = (lq_BT.detach() * batch.mask_BT).sum(1).exp()
        total = theta.new_zeros(())
        for x in range(len(q_X)):
            row = slice(x, x + 1)
            loss, _ = loss_fn(
                lq_BT[row], lq_BT[row].detach(), lp_BT[row], batch.mask_BT[row],
                discount=discount, num_tokens=1,
            )  # fmt: skip
            total = total + q_X[x] * loss
        return total

    return grad_of(weighted, student)


@pytest.mark.parametrize(
    ("estimator", "discount", "target"),
    [("pg", 0.0, "token"), ("pg", 1.0, "sequence"), ("k2", 0.0, "token")],
)
def test_expected_gradient_is_exact(models, estimator, discount, target):
    student, teacher = models
    exact_fn = tab.exact_token_rkl if target == "token" else tab.exact_sequence_rkl
    exact = grad_of(lambda th: exact_fn(th, teacher), student)
    got = expected_estimator_grad(models, estimator, discount)
    assert exact.norm() > 0.1
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)


def test_token_and_sequence_targets_differ(models):
    # Guards the two tests above against both targets collapsing into one.
    student, teacher = models
    tok = grad_of(lambda th: tab.exact_token_rkl(th, teacher), student)
    seq = grad_of(lambda th: tab.exact_sequence_rkl(th, teacher), student)
    assert rel_err(tok, seq) > 0.1


def test_seed_k1_expected_gradient_is_zero(models):
    exact = expected_estimator_grad(models, "seed_k1", 0.0)
    assert exact.abs().max().item() < 1e-12


def mc_grad(models, estimator: str, discount: float, n: int, seed: int) -> torch.Tensor:
    """Token-mean loss over ``n`` sampled sequences, as in training; scaled by mean length."""
    student, teacher = models
    batch = tab.sample(student, n, torch.Generator().manual_seed(seed))
    num_tokens = int(batch.mask_BT.sum())

    def loss(theta):
        lq_BT = tab.token_logprobs(theta, batch)
        lp_BT = tab.token_logprobs(teacher, batch)
        value, _ = SAMPLED_KD_LOSSES[estimator](
            lq_BT, lq_BT.detach(), lp_BT, batch.mask_BT, discount=discount, num_tokens=num_tokens
        )
        return value

    # Token-mean estimates grad / E[len]; rescale to the per-sequence target.
    return grad_of(loss, student) * num_tokens / n


@pytest.mark.parametrize(
    ("estimator", "discount", "target"),
    [("pg", 0.0, "token"), ("pg", 1.0, "sequence"), ("k2", 0.0, "token")],
)
def test_monte_carlo_gradient_matches_exact(models, estimator, discount, target):
    student, teacher = models
    exact_fn = tab.exact_token_rkl if target == "token" else tab.exact_sequence_rkl
    exact = grad_of(lambda th: exact_fn(th, teacher), student)
    got = mc_grad(models, estimator, discount, n=200_000, seed=2)
    assert cosine(got, exact) > 0.99
    assert rel_err(got, exact) < 0.05


def test_seed_k1_monte_carlo_gradient_is_noise(models):
    student, teacher = models
    exact = grad_of(lambda th: tab.exact_token_rkl(th, teacher), student)
    got = mc_grad(models, "seed_k1", 0.0, n=200_000, seed=3)
    assert got.norm() < 0.05 * exact.norm()


def reward_X(tokens_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """A task reward: how many times token 1 appears (a stand-in for a verifier)."""
    return ((tokens_BT == 1) & mask_BT).sum(1).double()


def exact_grad_reward(models) -> torch.Tensor:
    student, _ = models
    batch = tab.enumerate_all()

    def j(theta):
        lq_X = (tab.token_logprobs(theta, batch) * batch.mask_BT).sum(1)
        return (lq_X.exp() * reward_X(batch.tokens_BT, batch.mask_BT)).sum()

    return grad_of(j, student)


def kdrl_mc_grad(models, estimator: str, rl: float, distill: float, group: int, n_groups: int):
    student, teacher = models
    batch = tab.sample(student, group * n_groups, torch.Generator().manual_seed(4))
    n, num_tokens = group * n_groups, int(batch.mask_BT.sum())
    rewards_PG = reward_X(batch.tokens_BT, batch.mask_BT).view(n_groups, group)
    adv_BT = sequence_to_tokens(
        group_advantages(rewards_PG, std_norm=False).view(-1), batch.mask_BT
    )

    def loss(theta):
        lq_BT = tab.token_logprobs(theta, batch)
        value, _ = kdrl_loss(
            lq_BT, lq_BT.detach(), tab.token_logprobs(teacher, batch), adv_BT, batch.mask_BT,
            rl_loss_weight=rl, distill_loss_weight=distill, kd_estimator=estimator,
            num_tokens=num_tokens,
        )  # fmt: skip
        return value

    return grad_of(loss, student) * num_tokens / n


def test_kdrl_combination_matches_exact_and_seed_k1_does_not(models):
    student, teacher = models
    group = 4
    # A mean-baseline group advantage has expectation (1 - 1/G) * grad J; the PPO loss descends.
    grpo = -(1 - 1 / group) * exact_grad_reward(models)
    rkl = grad_of(lambda th: tab.exact_token_rkl(th, teacher), student)
    rl, distill = 1.0, float(grpo.norm() / rkl.norm())  # both terms equally strong
    target = rl * grpo + distill * rkl

    got = kdrl_mc_grad(models, "pg", rl, distill, group, n_groups=50_000)
    assert cosine(got, target) > 0.99
    assert rel_err(got, target) < 0.05

    reference = kdrl_mc_grad(models, "seed_k1", rl, distill, group, n_groups=50_000)
    assert rel_err(reference, rl * grpo) < 0.05  # plain GRPO ...
    assert rel_err(reference, target) > 0.3  # ... and the teacher signal is lost
