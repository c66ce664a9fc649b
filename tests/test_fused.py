"""The fused lm_head + log-prob path against the materialised one: values and gradients of
`fused_token_logprobs` against `token_logprobs` on explicit logits, `window_hidden` against the
logits Hugging Face computes, and the policy update and teacher scores with and without it."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

import kdrl.teacher
import kdrl.update
from kdrl.forward import response_window, window_logits
from kdrl.fused import (
    FUSED_MODEL_TYPES,
    fused_eligible,
    fused_token_logprobs,
    why_not_fused,
    window_hidden,
    window_token_logprobs,
)
from kdrl.logprobs import token_logprobs
from kdrl.rollout import RolloutBatch
from kdrl.teacher import LocalTeacher
from kdrl.update import LossSettings, UpdateBatch, policy_update

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=23, h=6, rows=40, vocab=31, dtype=torch.float64, seed=0):
    """Hidden states, an output embedding with ``rows - vocab`` padded rows past the support,
    ids in the support, and random weights for a loss on log-probs and entropy."""
    g = torch.Generator().manual_seed(seed)
    hidden_NH = 2 * torch.randn(n, h, generator=g, dtype=dtype)
    weight_VH = torch.randn(rows, h, generator=g, dtype=dtype)
    ids_N = torch.randint(0, vocab, (n,), generator=g)
    a_N, b_N = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    return hidden_NH, weight_VH, ids_N, a_N, b_N


def grads(fn, hidden_NH, weight_VH, objective):
    """Outputs of ``fn(hidden, weight)`` and the gradients of ``objective(outputs)``."""
    h = hidden_NH.clone().requires_grad_(True)
    w = weight_VH.clone().requires_grad_(True)
    out = fn(h, w)
    return out, torch.autograd.grad(objective(*out), (h, w))


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_values_and_gradients_equal_token_logprobs_float64(chunk_rows, temperature):
    hidden, weight, ids, a, b = problem()
    vocab = 31  # fewer than the 40 rows: the padded rows are outside the distribution

    def fused(h, w):
        return fused_token_logprobs(
            h,
            w,
            ids,
            temperature=temperature,
            vocab=vocab,
            chunk_rows=chunk_rows,
            with_entropy=True,
        )

    def materialised(h, w):
        return token_logprobs(h @ w[:vocab].T, ids, temperature=temperature, with_entropy=True)

    def objective(lp, ent):
        return (a * lp).sum() + (b * ent).sum()

    (lp, ent), (gh, gw) = grads(fused, hidden, weight, objective)
    (ref_lp, ref_ent), (ref_gh, ref_gw) = grads(materialised, hidden, weight, objective)
    assert lp.dtype == ent.dtype == torch.float64
    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp, ref_lp, **tight)
    torch.testing.assert_close(ent, ref_ent, **tight)
    torch.testing.assert_close(gh, ref_gh, **tight)
    torch.testing.assert_close(gw, ref_gw, **tight)
    assert gw[vocab:].abs().max() == 0 and gw[:vocab].abs().max() > 0


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_one_output_alone_gets_its_gradient(which):
    # Only one of the two outputs reaches the loss: autograd hands the other's gradient as None.
    hidden, weight, ids, a, _ = problem(seed=1)

    def objective(lp, ent):
        return (a * (lp if which == "logp" else ent)).sum()

    kw = dict(temperature=0.8, with_entropy=True)
    _, got = grads(
        lambda h, w: fused_token_logprobs(h, w, ids, chunk_rows=5, **kw), hidden, weight, objective
    )
    _, ref = grads(lambda h, w: token_logprobs(h @ w.T, ids, **kw), hidden, weight, objective)
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_float32_matches_the_materialised_float32_path():
    hidden, weight, ids, a, b = problem(n=50, h=16, rows=300, vocab=300, dtype=torch.float32)
    kw = dict(temperature=0.9, with_entropy=True)

    def objective(lp, ent):
        return (a * lp).sum() + (b * ent).sum()

    (lp, ent), (gh, gw) = grads(
        lambda h, w: fused_token_logprobs(h, w, ids, chunk_rows=9, **kw), hidden, weight, objective
    )
    (ref_lp, ref_ent), (ref_gh, ref_gw) = grads(
        lambda h, w: token_logprobs(h @ w.T, ids, **kw), hidden, weight, objective
    )
    assert lp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    for x, y in [(lp, ref_lp), (ent, ref_ent), (gh, ref_gh), (gw, ref_gw)]:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    hidden, weight, ids, _, _ = problem(n=9, h=4, rows=12, vocab=10, seed=2)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_token_logprobs(
            h, w, ids, temperature=1.3, vocab=10, chunk_rows=4, with_entropy=True
        ),
        (h, w),
    )


def test_bfloat16_inputs_give_float32_logprobs_and_bfloat16_gradients():
    hidden, weight, ids, a, _ = problem(n=20, h=16, rows=300, vocab=300, dtype=torch.float32)
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    lp, _ = fused_token_logprobs(h, w, ids, temperature=1.0, chunk_rows=6)
    ref, _ = token_logprobs(h.detach().double() @ w.detach().double().T, ids, temperature=1.0)
    assert lp.dtype == torch.float32
    # bf16 logits are rounded to ~3 significant digits (as the model's own lm_head rounds them).
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=0.1)
    (a.float() * lp).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_one_chunk_of_logits_at_a_time():
    # No [N, V] tensor, forward or backward; and never two [C, V] chunk buffers alive at once
    # (a view kept from the last chunk would hold its storage across the next product).
    n, h, v, rows = 64, 8, 4096, 16  # the weight's gradient [V, H] is smaller than a chunk
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    ids = torch.randint(0, v, (n,))
    largest, chunks_alive = [0], [0]
    storages: dict[int, weakref.ref] = {}

    class Spy(TorchDispatchMode):  # a dispatch mode also sees the backward pass's operations
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes() >= rows * v * 4:
                    largest[0] = max(largest[0], x.numel())
                    storage = x.untyped_storage()
                    storages.setdefault(id(storage), weakref.ref(storage))
                    alive = {id(r()) for r in storages.values() if r() is not None}
                    chunks_alive[0] = max(chunks_alive[0], len(alive))
            return out

    with Spy():
        lp, ent = fused_token_logprobs(
            hidden, weight, ids, temperature=1.0, chunk_rows=rows, with_entropy=True
        )
        (lp.sum() + ent.sum()).backward()
    assert largest[0] == rows * v
    assert chunks_alive[0] == 1


def test_rejects_bad_input():
    hidden, weight, ids, _, _ = problem()
    with pytest.raises(ValueError, match="temperature"):
        fused_token_logprobs(hidden, weight, ids, temperature=0.0)
    with pytest.raises(ValueError, match="vocab"):
        fused_token_logprobs(hidden, weight, ids, temperature=1.0, vocab=41)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        fused_token_logprobs(hidden, weight[:, :3], ids, temperature=1.0)


# --- models -------------------------------------------------------------------------------------


def rollout_batch(vocab: int, spans=((3, 5), (6, 2), (2, 7)), seed=0) -> RolloutBatch:
    """Right-padded sequences of (prompt, response) lengths with random ids."""
    g = torch.Generator().manual_seed(seed)
    t = max(p + r for p, r in spans)
    b = len(spans)
    ids = torch.zeros(b, t, dtype=torch.long)
    attn = torch.zeros(b, t, dtype=torch.long)
    resp = torch.zeros(b, t, dtype=torch.bool)
    for i, (p, r) in enumerate(spans):
        ids[i, : p + r] = torch.randint(3, vocab, (p + r,), generator=g)
        attn[i, : p + r] = 1
        resp[i, p : p + r] = True
    behav = torch.where(resp, -torch.rand(b, t, generator=g), 0.0)
    return RolloutBatch(ids, attn, resp, behav, list(range(b)), torch.zeros(b, dtype=torch.bool))


@pytest.fixture(scope="module")
def pair(tiny_pair):
    student = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    vocab = student.get_output_embeddings().weight.shape[0]
    assert teacher.get_output_embeddings().weight.shape[0] == vocab + 5  # padded rows
    return student, teacher, vocab


def test_window_hidden_is_what_the_lm_head_sees(pair):
    student, teacher, vocab = pair
    batch = rollout_batch(vocab)
    window = response_window(batch, [0, 1, 2])
    for model in (student, teacher):
        assert fused_eligible(model), why_not_fused(model)
        head = model.get_output_embeddings()
        with torch.no_grad():
            hidden_BWH = window_hidden(model, batch, window)
            logits_BWV = window_logits(model, batch, window)
            torch.testing.assert_close(hidden_BWH @ head.weight.T, logits_BWV)
            lp, ent = window_token_logprobs(
                model, batch, window, temperature=0.7, vocab=vocab, with_entropy=True
            )
            ref_lp, ref_ent = token_logprobs(
                logits_BWV[..., :vocab],
                window.take(batch.input_ids_BT),
                temperature=0.7,
                with_entropy=True,
            )
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        assert not head._forward_pre_hooks  # the hook is gone afterwards


def tiny_model(model_type: str, *, tie: bool = False, vocab: int = 67, seed: int = 0):
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
        shared_expert_intermediate_size=16,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    if model_type == "deepseek_v3":  # head size qk_rope + qk_nope; one kv head per head
        del kw["head_dim"]
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))


@pytest.mark.parametrize("model_type", sorted(FUSED_MODEL_TYPES))
def test_every_allowed_architecture_has_logits_lm_head_of_hidden(model_type):
    model = tiny_model(model_type).eval()
    assert fused_eligible(model), why_not_fused(model)
    batch = rollout_batch(67)
    window = response_window(batch, [0, 2])
    with torch.no_grad():
        got = window_hidden(model, batch, window) @ model.get_output_embeddings().weight.T
        torch.testing.assert_close(got, window_logits(model, batch, window))


def backward_grads(model, batch, *, fused: bool, vocab: int, temperature: float):
    """Gradients of every parameter of a loss on log-probs and entropy of the window's tokens."""
    model.zero_grad(set_to_none=True)
    window = response_window(batch, list(range(batch.num_sequences)))
    if fused:
        lp, ent = window_token_logprobs(
            model, batch, window, temperature=temperature, vocab=vocab, with_entropy=True
        )
    else:
        logits = window_logits(model, batch, window)[..., :vocab]
        lp, ent = token_logprobs(
            logits, window.take(batch.input_ids_BT), temperature=temperature, with_entropy=True
        )
    mask = window.take(batch.response_mask_BT)
    weights = torch.linspace(-1, 1, lp.numel()).reshape(lp.shape)
    ((weights * lp + 0.3 * ent) * mask).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "variant", ["student", "teacher_padded_vocab", "tied_embeddings", "gradient_checkpointing"]
)
def test_full_backward_equals_the_materialised_path(pair, variant):
    student, teacher, vocab = pair
    model = copy.deepcopy(teacher if variant == "teacher_padded_vocab" else student)
    if variant == "tied_embeddings":
        model = tiny_model("qwen3", tie=True, vocab=vocab, seed=3)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if variant == "gradient_checkpointing":
        model.gradient_checkpointing_enable()
    model.train()
    batch = rollout_batch(vocab, seed=4)
    got = backward_grads(model, batch, fused=True, vocab=vocab, temperature=0.8)
    ref = backward_grads(model, batch, fused=False, vocab=vocab, temperature=0.8)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert got.keys() == ref.keys() and len(got) == n_params  # every parameter has a gradient
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ineligible_models_say_why(pair):
    student = copy.deepcopy(pair[0])
    assert why_not_fused(student) is None
    student.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in why_not_fused(student)
    student.config.final_logit_softcapping = None
    head = student.lm_head
    student.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert "bias" in why_not_fused(student)
    student.lm_head = head
    handle = head.register_forward_hook(lambda m, args, out: out * 2)
    assert "hooks" in why_not_fused(student)
    handle.remove()
    custom = type("CustomLM", (type(student),), {"__module__": "my_models"})
    assert "remote or custom" in why_not_fused(custom(student.config))
    student.config.model_type = "cohere"
    assert "cohere" in why_not_fused(student)
    assert not fused_eligible(student)


def update_settings(estimator: str, vocab: int) -> LossSettings:
    return LossSettings(
        rl_loss_weight=0.5,
        distill_loss_weight=0.7,
        kd_estimator=estimator,
        kd_discount=0.0,
        kd_eps_clip=None,
        jsd_beta=0.5,
        student_temperature=0.9,
        eps_clip=0.2,
        eps_clip_higher=None,
        c_clip=None,
        vocab=vocab,
    )


def run_update(student, data, settings, monkeypatch, *, path: str, n_minibatches: int = 2):
    """One update; ``path="fused"`` fails if the logits are built, ``"materialised"`` forces
    them, ``"logits"`` fails if the fused path is taken."""
    model = copy.deepcopy(student)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"wrong path, expected {path}")

    with monkeypatch.context() as m:
        if path == "fused":
            m.setattr(kdrl.update, "window_logits", forbidden)
        elif path == "materialised":
            m.setattr(kdrl.update, "fused_eligible", lambda model: False)
        else:
            m.setattr(kdrl.update, "window_token_logprobs", forbidden)
        metrics = policy_update(
            model,
            optimizer,
            scheduler,
            data,
            settings,
            n_minibatches=n_minibatches,
            max_tokens_per_mb=12,
            max_grad_norm=0.0,
        )
    return model, metrics


def test_policy_update_fused_equals_materialised(pair, monkeypatch):
    student, teacher, vocab = pair
    batch = rollout_batch(vocab, spans=((3, 5), (6, 2), (2, 7), (4, 4)), seed=5)
    scores = LocalTeacher(teacher, temperature=1.0, max_tokens_per_mb=10**6, vocab=vocab).score(
        batch
    )
    data = UpdateBatch(batch, scores, torch.tensor([1.0, -0.5, 0.3, -1.0]), torch.ones(4))
    settings = update_settings("pg", vocab)
    got, got_metrics = run_update(student, data, settings, monkeypatch, path="fused")
    ref, ref_metrics = run_update(student, data, settings, monkeypatch, path="materialised")
    assert got_metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    moved = 0.0
    for (name, p), q, p0 in zip(
        got.named_parameters(), ref.parameters(), student.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved += float((p - p0).abs().sum().detach())
    assert moved > 0


def test_full_distribution_losses_keep_the_logits(pair, monkeypatch):
    # reverse_kl reads the student's [B, T, V] logits: the fused path must not be taken.
    student, teacher, vocab = pair
    batch = rollout_batch(vocab, seed=6)
    scores = LocalTeacher(teacher, temperature=1.0, max_tokens_per_mb=10**6, vocab=vocab).score(
        batch, top_k=vocab
    )
    data = UpdateBatch(batch, scores, torch.zeros(3), torch.ones(3))
    settings = update_settings("reverse_kl", vocab)
    # One minibatch: no "old" log-probs to recompute (those need no logits and take the fused path).
    _, metrics = run_update(student, data, settings, monkeypatch, path="logits", n_minibatches=1)
    assert metrics["loss/kd"] > 0


def test_teacher_scores_fused_equal_materialised(pair, monkeypatch):
    _, teacher, vocab = pair
    batch = rollout_batch(vocab, seed=7)
    scorer = LocalTeacher(teacher, temperature=0.8, max_tokens_per_mb=12, vocab=vocab)
    with monkeypatch.context() as m:
        m.setattr(kdrl.teacher, "window_logits", None)  # the sampled-token path needs no logits
        fused = scorer.score(batch)
    # top_k and candidate ids read the whole distribution: the materialised path, same values.
    full = scorer.score(batch, top_k=3, candidate_ids_BTC=batch.input_ids_BT[..., None])
    torch.testing.assert_close(fused.logprobs_BT, full.logprobs_BT, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.candidate_logprobs_BTC[..., 0], full.logprobs_BT)
    assert (fused.logprobs_BT[batch.response_mask_BT] < 0).all()
    assert (fused.logprobs_BT[~batch.response_mask_BT] == 0).all()


@pytest.mark.parametrize("top_k", [3, "V"])
def test_teacher_distribution_chunks_from_hidden_states_equal_the_logits(pair, top_k):
    # The top-k / full distribution and candidate log-probs are computed from the hidden states
    # chunk by chunk (two positions per chunk here) and must equal the materialised logits'.
    _, teacher, vocab = pair
    batch = rollout_batch(vocab, seed=8)
    scorer = LocalTeacher(teacher, temperature=0.7, max_tokens_per_mb=12, vocab=vocab)
    k = vocab if top_k == "V" else top_k
    cand = torch.randint(0, vocab, (*batch.input_ids_BT.shape, 4), generator=torch.Generator())
    kw = dict(top_k=k, candidate_ids_BTC=cand)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kdrl.teacher, "default_chunk_rows", lambda vocab, device: 2)
        m.setattr(kdrl.teacher, "window_logits", None)  # must not be needed
        chunked = scorer.score(batch, **kw)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kdrl.teacher, "fused_eligible", lambda model: False)
        ref = scorer.score(batch, **kw)
    for name in ("logprobs_BT", "topk_logprobs_BTK", "candidate_logprobs_BTC"):
        torch.testing.assert_close(
            getattr(chunked, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name
        )
    assert torch.equal(chunked.topk_ids_BTK, ref.topk_ids_BTK)
    assert (chunked.topk_logprobs_BTK[batch.response_mask_BT] < 0).all()
