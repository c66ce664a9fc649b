"""Rollout layout and behaviour log-probs, and teacher alignment against a toy teacher whose
next-token distribution is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.data import Prompt
from kdrl.rollout import HFRollout, RolloutBatch, inverse_cdf_sample
from kdrl.teacher import LocalTeacher
from loopback import batch_of

V = 7


class ShiftTeacher(torch.nn.Module):
    """p(next = (x + 1) mod V | x) = 0.9 (at temperature 1), the rest spread evenly."""

    device = torch.device("cpu")  # as a Hugging Face model reports it

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = torch.full((*input_ids.shape, V), math.log(0.1 / (V - 1)))
        logits.scatter_(-1, ((input_ids + 1) % V)[..., None], math.log(0.9))
        return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()


def expected_logprob(prev: int, tok: int, temperature: float) -> float:
    logits = torch.full((V,), math.log(0.1 / (V - 1)))
    logits[(prev + 1) % V] = math.log(0.9)
    return torch.log_softmax(logits / temperature, -1)[tok].item()


def make_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> RolloutBatch:
    """Right-padded [prompt | response] rows, like HFRollout produces."""
    return batch_of(rows, pad=pad)


# pad == eos == 6; a one-token response; prompts of different lengths; a response that ends in
# EOS followed by padding that is also EOS.
ROWS = [([1, 2, 3], [4]), ([5], [6]), ([0, 1, 2, 3, 4, 5], [6, 0, 1]), ([2, 2], [3, 4, 5, 6])]


@pytest.mark.parametrize("max_tokens", [1, 5, 12, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_teacher_logprobs_are_aligned_position_by_position(max_tokens, temperature):
    batch = make_batch(ROWS, pad=6)
    out = LocalTeacher(
        ShiftTeacher(), temperature=temperature, max_tokens_per_mb=max_tokens, vocab=V
    ).score(batch)
    for b, (p, r) in enumerate(ROWS):
        seq = p + r
        for t in range(len(p), len(seq)):
            want = expected_logprob(seq[t - 1], seq[t], temperature)
            assert out.logprobs_BT[b, t].item() == pytest.approx(want, abs=1e-6), (b, t)
    assert (out.logprobs_BT[~batch.response_mask_BT] == 0).all()


def test_teacher_topk_and_full_distribution():
    batch = make_batch(ROWS, pad=6)
    teacher = LocalTeacher(ShiftTeacher(), temperature=1.0, max_tokens_per_mb=8, vocab=V)
    top = teacher.score(batch, top_k=2)
    b, t = 0, 3  # predicts token 4 after token 3: the top id is (3 + 1) % V = 4
    assert top.topk_ids_BTK[b, t, 0].item() == 4
    assert top.topk_logprobs_BTK[b, t, 0].item() == pytest.approx(math.log(0.9), abs=1e-6)
    full = teacher.score(batch, top_k=10**9)
    assert full.topk_logprobs_BTK.shape[-1] == V
    # The full distribution's ids are arange(V) at every position, as a view (no [B, T, V]).
    assert full.topk_ids_BTK.stride() == (0, 0, 1)
    assert torch.equal(full.topk_ids_BTK[1, 2], torch.arange(V))
    assert (full.topk_logprobs_BTK[~batch.response_mask_BT] == 0).all()
    torch.testing.assert_close(full.topk_logprobs_BTK[b, t].exp().sum(), torch.tensor(1.0))


def test_teacher_vocab_cut_renormalises_over_student_ids():
    batch = make_batch([([1, 2], [3])], pad=6)
    out = LocalTeacher(ShiftTeacher(), temperature=1.0, max_tokens_per_mb=8, vocab=V - 1).score(
        batch
    )
    logits = torch.full((V - 1,), math.log(0.1 / (V - 1)))
    logits[3] = math.log(0.9)
    assert out.logprobs_BT[0, 2].item() == pytest.approx(logits.log_softmax(-1)[3].item(), abs=1e-6)


@pytest.fixture(scope="module")
def student(tiny_pair):
    path = tiny_pair[0]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def prompts(tok, texts):
    return [Prompt(index=i, text=t, ids=tok(t, add_special_tokens=False)["input_ids"], answer=None,
                   truncated=False) for i, t in enumerate(texts)]  # fmt: skip


@pytest.mark.parametrize("seed", [None, 123])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_a_forward_pass(student, temperature, seed):
    model, tok = student
    torch.manual_seed(0)
    rollout = HFRollout(model, tok, temperature=temperature, top_p=1.0, max_new_tokens=12)
    batch = rollout.generate(prompts(tok, ["ab", "hello there", "x"]), n_samples=3, seed=seed)
    assert batch.num_sequences == 9 and batch.prompt_index_B == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp = (logits[:, :-1] / temperature).log_softmax(-1)
    want = logp.gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask_BT[:, 1:]
    torch.testing.assert_close(batch.behav_logprobs_BT[:, 1:][mask], want[mask], atol=1e-4, rtol=0)
    assert (batch.behav_logprobs_BT[~batch.response_mask_BT] == 0).all()


def test_layout_eos_truncation_and_text(student):
    model, tok = student
    torch.manual_seed(1)
    rollout = HFRollout(model, tok, temperature=1.0, top_p=1.0, max_new_tokens=6)
    ps = prompts(tok, ["abc", "de"])
    batch = rollout.generate(ps, n_samples=8)
    eos = tok.eos_token_id
    for b in range(batch.num_sequences):
        p = ps[batch.prompt_index_B[b]].ids
        n = int(batch.attention_mask_BT[b].sum())
        assert batch.input_ids_BT[b, : len(p)].tolist() == p
        resp = batch.input_ids_BT[b, len(p) : n].tolist()
        assert batch.response_mask_BT[b].sum() == len(resp) >= 1
        assert eos not in resp[:-1]  # nothing after the first EOS
        assert batch.truncated_B[b] == (resp[-1] != eos)
        assert batch.truncated_B[b] == (len(resp) == 6 and resp[-1] != eos)
        assert batch.response_texts[b] == tok.decode(resp, skip_special_tokens=True)


@pytest.mark.parametrize("seed", [None, 5])
def test_top_p_restricts_sampling_to_the_nucleus(student, seed):
    model, tok = student
    torch.manual_seed(2)
    rollout = HFRollout(model, tok, temperature=1.0, top_p=1e-4, max_new_tokens=4)
    batch = rollout.generate(prompts(tok, ["ab"]), n_samples=6, seed=seed)
    # A nucleus this small holds one token at each step: all samples agree, with log-prob 0.
    rows = batch.input_ids_BT
    assert all(torch.equal(rows[0], rows[i]) for i in range(6))
    assert batch.behav_logprobs_BT[batch.response_mask_BT].abs().max() < 1e-6


def test_padded_vocabulary_rows_are_never_sampled(tiny_pair):
    # The teacher folder's model has 5 embedding rows past its tokenizer; make them dominant.
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1])
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tok) :] *= 1000
    torch.manual_seed(3)
    rollout = HFRollout(model, tok, temperature=1.0, top_p=1.0, max_new_tokens=5)
    for seed in (None, 9):
        batch = rollout.generate(prompts(tok, ["ab"]), n_samples=4, seed=seed)
        assert batch.input_ids_BT.max() < len(tok)


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(student):
    # What makes N data-parallel ranks draw exactly what one process draws.
    model, tok = student
    rollout = HFRollout(model, tok, temperature=1.0, top_p=0.95, max_new_tokens=10)
    ps = prompts(tok, ["ab", "hello there", "x", "q"])
    whole = rollout.generate(ps, n_samples=2, seed=7)
    torch.manual_seed(99)  # the global RNG plays no part
    halves = [rollout.generate(ps[i : i + 2], n_samples=2, seed=7) for i in (0, 2)]
    again = rollout.generate(ps, n_samples=2, seed=7)
    other = rollout.generate(ps, n_samples=2, seed=8)
    assert whole.response_texts == halves[0].response_texts + halves[1].response_texts
    assert whole.response_texts == again.response_texts
    assert whole.response_texts != other.response_texts
    rows = [whole.input_ids_BT[b][whole.attention_mask_BT[b].bool()] for b in range(8)]
    half_rows = [h.input_ids_BT[b][h.attention_mask_BT[b].bool()] for h in halves for b in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(rows, half_rows, strict=True))
    torch.testing.assert_close(
        whole.behav_logprobs_BT[whole.response_mask_BT],
        torch.cat([h.behav_logprobs_BT[h.response_mask_BT] for h in halves]), atol=1e-5, rtol=0,
    )  # fmt: skip


def test_seeded_sampling_follows_the_model_distribution(student):
    model, tok = student
    rollout = HFRollout(model, tok, temperature=1.0, top_p=1.0, max_new_tokens=1)
    (p,) = prompts(tok, ["ab"])
    batch = rollout.generate([p], n_samples=2000, seed=11)
    first = batch.input_ids_BT[:, len(p.ids)]
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([p.ids])).logits[0, -1, : len(tok)].softmax(-1)
    freq = torch.bincount(first, minlength=len(tok)).float() / 2000
    # Total variation of 2000 draws from this distribution is ~0.05; a wrong sampler is far off.
    assert 0.5 * (freq - probs).abs().sum() < 0.1


def test_inverse_cdf_draws_match_the_distribution_and_never_a_zero_mass_id():
    # Unnormalised on purpose; ids 0, 2 and 5 have no mass.
    probs = torch.tensor([0.0, 1.0, 0.0, 0.6, 0.4, 0.0])
    n = 20000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    picked = inverse_cdf_sample(probs.expand(n, -1), gens)
    freq = torch.bincount(picked, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    # 3 sigma of a 20000-draw frequency is <= 0.011.
    torch.testing.assert_close(freq, (probs / probs.sum()).double(), atol=0.012, rtol=0)
    # Each draw is u -> first id whose cumulative mass exceeds u * total, u from its generator.
    u = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(i),
                                dtype=torch.float64) for i in range(50)])  # fmt: skip
    expected = torch.searchsorted(probs.double().cumsum(0), u * 2.0, right=True)
    assert torch.equal(picked[:50], expected)


def test_model_generation_defaults_do_not_leak_into_sampling(tiny_pair):
    # Released checkpoints ship sampling defaults (SmolLM2: temperature 0.2, top_p 0.9). The
    # rollout must sample from exactly the configured distribution regardless.
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty = True, 0.2, 3, 0.5, 2.0
    torch.manual_seed(4)
    batch = HFRollout(model, tok, temperature=1.0, top_p=1.0, max_new_tokens=10).generate(
        prompts(tok, ["ab", "cd"]), n_samples=4
    )
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    want = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask_BT[:, 1:]
    torch.testing.assert_close(batch.behav_logprobs_BT[:, 1:][mask], want[mask], atol=1e-4, rtol=0)
    # With top_k 3 leaking in, some sampled token would lie outside the model's top 3.
    ranks = (logits[:, :-1] > logits[:, :-1].gather(-1, batch.input_ids_BT[:, 1:, None])).sum(-1)
    assert ranks[mask].max() >= 3
