"""Chunked token log-probs and entropy against the naive float64 computation."""

from __future__ import annotations

import pytest
import torch

from kdrl.logprobs import token_logprobs


def naive(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_values_match_naive(chunk_rows, temperature):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 13, 257, generator=g)
    ids = torch.randint(0, 257, (5, 13), generator=g)
    lp, ent = token_logprobs(
        logits, ids, temperature=temperature, with_entropy=True, chunk_rows=chunk_rows
    )
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    # Same precision as the naive float32 way, and close to the float64 truth.
    logp32 = torch.log_softmax(logits / temperature, dim=-1)
    torch.testing.assert_close(
        lp, logp32.gather(-1, ids[..., None]).squeeze(-1), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(ent, -(logp32.exp() * logp32).sum(-1), rtol=0, atol=1e-5)
    ref_lp, ref_ent = naive(logits, ids, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradients_match_naive(with_entropy):
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3, 9, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    w_lp, w_ent = (
        torch.randn(3, 9, generator=g, dtype=torch.float64),
        torch.randn(3, 9, generator=g, dtype=torch.float64),
    )

    def objective(fn_out):
        lp, ent = fn_out
        return (w_lp * lp).sum() + ((w_ent * ent).sum() if with_entropy else 0.0)

    x = logits.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(
        objective(token_logprobs(x, ids, temperature=0.8, with_entropy=with_entropy, chunk_rows=4)),
        x,
    )
    y = logits.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(objective(naive(y, ids, 0.8)), y)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (6,), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, ids, temperature=1.3, with_entropy=True, chunk_rows=4), (x,)
    )


def test_bfloat16_logits_are_upcast_and_grad_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(20, 300, generator=g)).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 300, (20,), generator=g)
    lp, _ = token_logprobs(logits, ids, temperature=1.0, chunk_rows=6)
    ref, _ = naive(logits.detach().float(), ids, 1.0)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=1e-5)
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_chunks_bound_memory():
    # With one row per chunk, no temporary larger than [1, V] is needed: check the largest
    # float32 allocation by counting elements of tensors created inside the op.
    v, n = 4096, 64
    logits = torch.randn(n, v, requires_grad=True)
    ids = torch.randint(0, v, (n,))
    sizes: list[int] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.data_ptr() != logits.data_ptr():
                sizes.append(out.numel())
            return out

    with Spy():
        lp, _ = token_logprobs(logits, ids, temperature=1.0, with_entropy=True, chunk_rows=8)
        lp.sum().backward()
    large = [s for s in sizes if s > 8 * v]
    # Only the gradient buffer (same shape as the input logits) may be [N, V].
    assert all(s == n * v for s in large) and len(large) <= 1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), temperature=1.0)
