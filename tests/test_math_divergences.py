"""Full-distribution divergences against float64 references written out term by term."""

from __future__ import annotations

import math

import pytest
import torch

from kdrl.divergences import full_divergence_loss, generalized_jsd, topk_divergence_loss


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for probability rows, with 0 log 0 = 0, in float64."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


def ref_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def rows(seed: int, n: int = 6, v: int = 17, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    s = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    return t.log_softmax(-1), s.log_softmax(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_reference(beta):
    t, s = rows(0)
    got = generalized_jsd(t, s, beta=beta)
    if beta == 0.0:
        ref = ref_kl(t.exp(), s.exp())
    elif beta == 1.0:
        ref = ref_kl(s.exp(), t.exp())
    else:
        ref = ref_jsd(t.exp(), s.exp(), beta)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_kl_of_a_distribution_with_itself_is_zero():
    t, _ = rows(1)
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd(t, t, beta=beta).abs().max().item() < 1e-14


def test_jsd_half_is_symmetric_and_bounded():
    t, s = rows(2)
    a, b = generalized_jsd(t, s, beta=0.5), generalized_jsd(s, t, beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert (a <= math.log(2)).all() and (a >= 0).all()


def test_mixture_weights_are_not_swapped():
    # JSD_beta / (beta (1 - beta)) tends to forward KL as beta -> 0 and reverse KL as beta -> 1:
    # a swapped mixture (a classic bug) reverses the two limits.
    t, s = rows(3, scale=0.5)
    eps = 1e-4
    fwd, rev = ref_kl(t.exp(), s.exp()), ref_kl(s.exp(), t.exp())
    near0 = generalized_jsd(t, s, beta=eps) / (eps * (1 - eps))
    near1 = generalized_jsd(t, s, beta=1 - eps) / (eps * (1 - eps))
    torch.testing.assert_close(near0, fwd, rtol=1e-2, atol=0)
    torch.testing.assert_close(near1, rev, rtol=1e-2, atol=0)
    assert (fwd - rev).abs().max() > 0.05


def test_zero_probability_terms():
    # Teacher puts zero mass on some ids: forward KL ignores them, reverse KL is infinite where
    # the student has mass there, and nothing is nan.
    t = torch.tensor([[0.0, -math.inf, math.log(1.0)]]).log_softmax(-1)
    s = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64).log_softmax(-1)
    fwd = generalized_jsd(t.double(), s, beta=0.0)
    torch.testing.assert_close(fwd, ref_kl(t.double().exp(), s.exp()))
    assert torch.isinf(generalized_jsd(t.double(), s, beta=1.0)).all()
    assert torch.isfinite(generalized_jsd(t.double(), s, beta=0.5)).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_full_loss_with_temperatures_and_chunks(kind):
    g = torch.Generator().manual_seed(4)
    s_logits = 2 * torch.randn(4, 5, 33, generator=g, dtype=torch.float64)
    t_logits = 2 * torch.randn(4, 5, 33, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.3
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.3}[kind]
    p, q = (t_logits / 1.3).softmax(-1), (s_logits / 0.7).softmax(-1)
    per_pos = ref_jsd(p, q, beta) if kind == "jsd" else ref_kl(*((p, q) if beta == 0 else (q, p)))
    ref = per_pos[mask].sum() / 11.0
    x = s_logits.clone().requires_grad_(True)
    got = full_divergence_loss(
        x, t_logits, mask, kind=kind, beta=0.3, student_temperature=0.7,
        teacher_temperature=1.3, num_tokens=11.0, chunk_rows=3,
    )  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # Gradients equal those of the unchunked float64 reference, and are 0 at masked rows.
    (g_got,) = torch.autograd.grad(got, x)
    y = s_logits.clone().requires_grad_(True)
    q_y = (y / 0.7).softmax(-1)
    pp = ref_jsd(p, q_y, beta) if kind == "jsd" else ref_kl(*((p, q_y) if beta == 0 else (q_y, p)))
    (g_ref,) = torch.autograd.grad(pp[mask].sum() / 11.0, y)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    assert (g_got[~mask] == 0).all()


def test_padded_teacher_vocabulary_is_cut():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64)
    t = torch.randn(3, 10, generator=g, dtype=torch.float64)
    padded = torch.cat([t, torch.full((3, 2), -30.0, dtype=torch.float64)], -1)
    mask = torch.ones(3, dtype=torch.bool)
    kw = dict(kind="reverse_kl", student_temperature=1.0, teacher_temperature=1.0, num_tokens=3)
    torch.testing.assert_close(
        full_divergence_loss(s, padded, mask, **kw), full_divergence_loss(s, t, mask, **kw)
    )
    with pytest.raises(ValueError, match="smaller than"):
        full_divergence_loss(s, t[:, :9], mask, **kw)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_k_equal_v_is_the_full_divergence(kind):
    g = torch.Generator().manual_seed(6)
    s = 2 * torch.randn(7, 12, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(7, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(7, dtype=torch.bool)
    t_logp = t.log_softmax(-1)
    top_lp, top_ids = t_logp.topk(12, dim=-1)
    kw = dict(kind=kind, beta=0.4, student_temperature=1.0, num_tokens=7)
    full = full_divergence_loss(s, t, mask, teacher_temperature=1.0, **kw)
    torch.testing.assert_close(topk_divergence_loss(s, top_lp, top_ids, mask, **kw), full)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_every_id_broadcast_view_is_the_full_divergence_with_its_gradient(kind):
    # A local teacher gives the full distribution as id-ordered log-probs with arange ids
    # broadcast to every position (no memory); that path skips the gather. Value and gradient
    # must equal the reference full divergence, with masked rows and chunking.
    g = torch.Generator().manual_seed(7)
    s = (2 * torch.randn(2, 5, 12, generator=g, dtype=torch.float64)).requires_grad_()
    t_logp = (2 * torch.randn(2, 5, 12, generator=g, dtype=torch.float64)).log_softmax(-1)
    mask = torch.rand(2, 5, generator=g) > 0.3
    ids = torch.arange(12).expand(2, 5, 12)
    assert ids.stride()[:2] == (0, 0)
    kw = dict(kind=kind, beta=0.4, student_temperature=1.3, num_tokens=7, chunk_rows=3)
    got = topk_divergence_loss(s, t_logp, ids, mask, **kw)
    (grad,) = torch.autograd.grad(got, s)
    ref = full_divergence_loss(s, t_logp, mask, teacher_temperature=1.0, **kw)
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(grad, ref_grad)
    # The same ids as an ordinary tensor take the gather path: same answer.
    gathered = topk_divergence_loss(s, t_logp, ids.contiguous(), mask, **kw)
    torch.testing.assert_close(gathered, ref)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_tail_bucket_matches_reference(kind):
    g = torch.Generator().manual_seed(7)
    s = 2 * torch.randn(5, 20, generator=g, dtype=torch.float64)
    t_logp = (2 * torch.randn(5, 20, generator=g, dtype=torch.float64)).log_softmax(-1)
    k = 4
    top_lp, top_ids = t_logp.topk(k, dim=-1)
    q = s.softmax(-1)
    q_k = q.gather(-1, top_ids)
    p_k = top_lp.exp()
    p2 = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q2 = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.4}[kind]
    ref = ref_jsd(p2, q2, beta) if kind == "jsd" else ref_kl(*((p2, q2) if beta == 0 else (q2, p2)))
    mask = torch.tensor([True, True, False, True, True])
    got = topk_divergence_loss(
        s, top_lp, top_ids, mask, kind=kind, beta=0.4, student_temperature=1.0, num_tokens=4,
        chunk_rows=2,
    )  # fmt: skip
    torch.testing.assert_close(got, ref[mask].sum() / 4, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_masked_rows_with_inf_teacher_stay_finite(kind):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g)
    t[1] = -math.inf  # a padding row, as a server might send it
    t[3, :4] = -math.inf
    mask = torch.tensor([True, False, True, False])
    top_lp, top_ids = t.log_softmax(-1).topk(3, dim=-1)
    for loss in (
        full_divergence_loss(s, t, mask, kind=kind, student_temperature=1.0,
                             teacher_temperature=1.0, num_tokens=2),
        topk_divergence_loss(s, top_lp, top_ids, mask, kind=kind, student_temperature=1.0,
                             num_tokens=2),
    ):  # fmt: skip
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()


def test_unknown_kind_is_rejected():
    t, s = rows(9)
    with pytest.raises(ValueError, match="unknown divergence"):
        full_divergence_loss(
            s,
            t,
            torch.ones(6, dtype=torch.bool),
            kind="kl",
            student_temperature=1.0,
            teacher_temperature=1.0,
            num_tokens=1,
        )
