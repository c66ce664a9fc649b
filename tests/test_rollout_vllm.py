"""The vLLM rollout backend against the Hugging Face model it must reproduce.

Runs only where vLLM is installed (``/work/vllm-venv`` on the project machine); one in-process
engine serves the whole module. The student is a tiny Llama with head size 32 (vLLM's CPU
attention has no kernel for the head size 16 of the shared ``tiny_pair`` fixture), briefly fitted
so that some answers end in EOS and some hit ``max_new_tokens``, with 5 padded vocabulary rows
made dominant (sampled once, they would show up in every answer) and with sampling defaults and
an extra EOS id in its ``generation_config.json`` that must be ignored.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer

from kdrl.data import Prompt
from kdrl.logprobs import token_logprobs
from kdrl.rollout_vllm import VLLMRollout
from kdrl.tiny import char_tokenizer, fit_tiny, save_tiny, tiny_causal_lm

pytestmark = pytest.mark.slow

MAX_NEW = 16
# float32 engine vs float32 teacher-forced forward; measured max |diff| 1.0e-6 on this machine.
ATOL = 1e-4
TEXTS = ["ab", "hello", "the c", "12+"]
LONG = "x" * 150  # longer than one KV block (128 tokens on the CPU): the prefix cache holds it


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=64, layers=2, heads=2, vocab_rows=len(tok) + 5, seed=1)
    fit_tiny(model, tok, ["ab", "abc", "hello", "hello there", "x", "the cat sat", "12+3=15"],
             steps=5)  # fmt: skip
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tok) :] *= 1000
    # Released checkpoints ship sampling defaults and extra EOS ids; none may reach the sampler.
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty = True, 0.2, 3, 0.5, 2.0
    gc.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("e")]
    return save_tiny(tmp_path_factory.mktemp("vllm_student"), tok, model)


@pytest.fixture(scope="module")
def hf(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(student_dir)


@pytest.fixture(scope="module")
def engine(student_dir, hf):
    rollout = VLLMRollout(
        student_dir, hf[1], temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW,
        dtype=torch.float32, max_model_len=256, seed=0, kv_cache_gb=0.25,
    )  # fmt: skip
    yield rollout
    rollout.close()


def prompts(tok, texts):
    return [Prompt(index=i, text=t, ids=tok(t, add_special_tokens=False)["input_ids"], answer=None,
                   truncated=False) for i, t in enumerate(texts)]  # fmt: skip


def reference_logprobs(model, batch, *, temperature, top_p, vocab):
    """Teacher-forced log-probs ``[B, T-1]`` of each next token under the sampling distribution:
    padded rows masked, logits / temperature, top-p nucleus, renormalised."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logits = logits[:, :-1].float()
    logits[..., vocab:] = -torch.inf
    if top_p < 1:
        scaled = logits / temperature
        sorted_, order = scaled.sort(-1, descending=True)
        probs = sorted_.softmax(-1)
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        drop.scatter_(-1, order, probs.cumsum(-1) - probs >= top_p)
        logits = logits.masked_fill(drop, -torch.inf)
    logp, _ = token_logprobs(logits, batch.input_ids_BT[:, 1:], temperature=temperature)
    return logp


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.8), (0.0, 1.0)])
def test_behaviour_logprobs_match_the_trainer_model(engine, hf, temperature, top_p):
    model, tok = hf
    rollout = engine.with_sampling(temperature=temperature, top_p=top_p)
    batch = rollout.generate(prompts(tok, TEXTS), n_samples=6, seed=1)
    mask = batch.response_mask_BT[:, 1:]
    got = batch.behav_logprobs_BT[:, 1:][mask]
    # Greedy answers record the untempered log-probs, as HFRollout does.
    t_ref = temperature or 1.0
    want = reference_logprobs(model, batch, temperature=t_ref, top_p=top_p, vocab=len(tok))
    torch.testing.assert_close(got, want[mask], atol=ATOL, rtol=0)
    assert (batch.behav_logprobs_BT[~batch.response_mask_BT] == 0).all()
    assert batch.input_ids_BT.max() < len(tok)  # the dominant padded rows were never sampled
    if temperature == 0:  # every token is the argmax of the masked logits
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids_BT).logits[:, :-1, : len(tok)]
        assert torch.equal(logits.argmax(-1)[mask], batch.input_ids_BT[:, 1:][mask])
    if top_p < 1:
        # The nucleus mattered: without it the same tokens have clearly other log-probs.
        full = reference_logprobs(model, batch, temperature=temperature, top_p=1.0, vocab=len(tok))
        assert (full[mask] - got).abs().max() > 1e-2


def test_layout_eos_truncation_and_text(engine, hf):
    _, tok = hf
    ps = prompts(tok, TEXTS)
    batch = engine.generate(ps, n_samples=8, seed=2)
    eos = tok.eos_token_id
    assert batch.prompt_index_B == [i for i in range(len(TEXTS)) for _ in range(8)]
    assert batch.truncated_B.any() and not batch.truncated_B.all()  # both kinds of ending occur
    for b in range(batch.num_sequences):
        p = ps[batch.prompt_index_B[b]].ids
        n = int(batch.attention_mask_BT[b].sum())
        assert batch.attention_mask_BT[b, :n].all() and not batch.attention_mask_BT[b, n:].any()
        assert batch.input_ids_BT[b, : len(p)].tolist() == p
        resp = batch.input_ids_BT[b, len(p) : n].tolist()
        assert batch.response_mask_BT[b].sum() == len(resp) >= 1
        assert batch.response_mask_BT[b, len(p) : n].all()
        assert eos not in resp[:-1]  # the response ends at its first EOS, which is kept
        assert batch.truncated_B[b] == (resp[-1] != eos)
        assert batch.truncated_B[b] == (len(resp) == MAX_NEW and resp[-1] != eos)
        assert (batch.input_ids_BT[b, n:] == tok.pad_token_id).all()
        assert batch.response_texts[b] == tok.decode(resp, skip_special_tokens=True)


def test_seeds_fix_each_sequence_whatever_the_batch(engine, hf):
    _, tok = hf
    rollout = engine.with_sampling(temperature=1.0, top_p=0.95)
    ps = prompts(tok, TEXTS)
    whole = rollout.generate(ps, n_samples=2, seed=7)
    again = rollout.generate(ps, n_samples=2, seed=7)
    other = rollout.generate(ps, n_samples=2, seed=8)
    halves = [rollout.generate(ps[i : i + 2], n_samples=2, seed=7) for i in (0, 2)]
    assert torch.equal(whole.input_ids_BT, again.input_ids_BT)
    assert torch.equal(whole.behav_logprobs_BT, again.behav_logprobs_BT)
    assert whole.response_texts != other.response_texts
    # What lets N data-parallel ranks draw exactly what one process draws.
    assert whole.response_texts == halves[0].response_texts + halves[1].response_texts
    torch.testing.assert_close(
        whole.behav_logprobs_BT[whole.response_mask_BT],
        torch.cat([h.behav_logprobs_BT[h.response_mask_BT] for h in halves]), atol=1e-5, rtol=0,
    )  # fmt: skip
    # Each sequence has its own seed, from the prompt's row in the data and the sample number.
    assert len(set(whole.response_texts)) > len(TEXTS)
    moved = [Prompt(p.index + 100, p.text, p.ids, None, False) for p in ps]
    assert rollout.generate(moved, n_samples=2, seed=7).response_texts != whole.response_texts
    # Without a seed, samples come from the global RNG, like HFRollout's.
    torch.manual_seed(5)
    first = rollout.generate(ps, n_samples=2)
    torch.manual_seed(5)
    assert first.response_texts == rollout.generate(ps, n_samples=2).response_texts


def test_seeded_sampling_follows_the_model_distribution(engine, hf):
    # Matching log-probs say which distribution vLLM reports, not that it samples from it.
    model, tok = hf
    rollout = engine.with_sampling(temperature=0.7, top_p=0.9, max_new_tokens=1)
    (p,) = prompts(tok, ["ab"])
    n = 2000
    batch = rollout.generate([p], n_samples=n, seed=11)
    first = batch.input_ids_BT[:, len(p.ids)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p.ids])).logits[0, -1, : len(tok)] / 0.7
    probs = logits.softmax(-1)
    sorted_, order = probs.sort(descending=True)
    nucleus = order[(sorted_.cumsum(0) - sorted_) < 0.9]
    want = torch.zeros_like(probs)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    freq = torch.bincount(first, minlength=len(tok)).float() / n
    assert set(first.unique().tolist()) <= set(nucleus.tolist())
    # Total variation of 2000 draws from this distribution is ~0.05; a wrong sampler is far off.
    assert 0.5 * (freq - want).abs().sum() < 0.1


def test_sync_weights_moves_the_engine_to_the_trainer_weights(engine, hf, student_dir):
    old, tok = hf
    model = copy.deepcopy(old).train()
    ps = prompts(tok, [*TEXTS, LONG])
    before = engine.generate(ps, n_samples=3, seed=4)  # fills the prefix cache with old weights
    # One optimizer step, in this process, on the trainer's model.
    enc = tok(["hello there", "the cat sat"], add_special_tokens=False, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    optimizer.step()
    model.eval()
    try:
        engine.sync_weights(model)
        after = engine.generate(ps, n_samples=3, seed=4)
        mask = after.response_mask_BT[:, 1:]
        got = after.behav_logprobs_BT[:, 1:][mask]
        new_lp = reference_logprobs(model, after, temperature=1.0, top_p=1.0, vocab=len(tok))
        old_lp = reference_logprobs(old, after, temperature=1.0, top_p=1.0, vocab=len(tok))
        torch.testing.assert_close(got, new_lp[mask], atol=ATOL, rtol=0)
        assert (got - old_lp[mask]).abs().max() > 0.1
        assert after.response_texts != before.response_texts
        # The engine holds a copy: changing the trainer's tensors without a sync changes nothing.
        synced = copy.deepcopy(model)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        again = engine.generate(ps, n_samples=3, seed=4)
        assert torch.equal(again.input_ids_BT, after.input_ids_BT)
        ref = reference_logprobs(synced, again, temperature=1.0, top_p=1.0, vocab=len(tok))
        torch.testing.assert_close(
            again.behav_logprobs_BT[:, 1:][mask], ref[mask], atol=ATOL, rtol=0
        )
    finally:
        engine.sync_weights(old)  # the module's other tests sample the original model
    restored = engine.generate(ps, n_samples=3, seed=4)
    assert torch.equal(restored.input_ids_BT, before.input_ids_BT)
    torch.testing.assert_close(restored.behav_logprobs_BT, before.behav_logprobs_BT, atol=ATOL,
                               rtol=0)  # fmt: skip


def test_a_partial_weight_sync_is_an_error(engine, hf):
    model, _ = hf

    class Partial:  # e.g. a wrapper whose state dict lacks a tensor
        def state_dict(self):
            state = dict(model.state_dict())
            del state["model.layers.0.mlp.down_proj.weight"]
            return state

    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        engine.sync_weights(Partial())
    engine.sync_weights(model)


def test_prompt_too_long_for_the_engine_is_an_error(engine, hf):
    _, tok = hf
    with pytest.raises(ValueError, match="max_model_len=256"):
        engine.generate(prompts(tok, ["y" * 250]), n_samples=1, seed=0)


def test_training_with_the_vllm_backend_keeps_engine_and_trainer_equal(student_dir, tmp_path):
    """`kdrl train rollout.backend=vllm` end to end in its own process: after every optimizer
    step the engine samples from the trainer's new weights (the behaviour log-probs the engine
    records equal the trainer's own to float32 precision), and the run saves a loadable model."""
    import json
    import os
    import subprocess
    import sys

    from kdrl.metrics import read_metrics

    tok = char_tokenizer()
    teacher_model = tiny_causal_lm(tok, hidden=64, layers=3, vocab_rows=len(tok) + 5, seed=2)
    teacher = save_tiny(tmp_path / "teacher", tok, teacher_model)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS * 2))
    out = tmp_path / "run"
    args = [f"student.path={student_dir}", f"teacher.path={teacher}", f"data.path={data}",
            "data.chat_template=false", "teacher.rl_loss_weight=0", "teacher.distill_loss_weight=1",
            "train.batch_size=2", "rollout.n_samples=2", f"rollout.max_new_tokens={MAX_NEW}",
            "rollout.backend=vllm", "rollout.vllm.cpu_kvcache_gb=0.25", "optim.lr=1e-2",
            "train.max_steps=3", "train.tensorboard=false", f"train.output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdrl", "train", *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # lr 1e-2 moves the weights far: a missed push would show as a gap of order 0.1.
    assert all(r["actor/behav_logprob_gap"] < 1e-4 for r in rows), rows
    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-00000003")
