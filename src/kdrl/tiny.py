"""Tiny tokenizers and models built offline, for tests, the synthetic demo and experiments.

Nothing here is downloaded: a character-level tokenizer with a ChatML chat template, and small
random Llama models, saved as ordinary Hugging Face folders that load with
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>")
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(
    chars: str = DEFAULT_CHARS, *, pad_is_eos: bool = False
) -> PreTrainedTokenizerFast:
    """One token per character plus ChatML special tokens; EOS is ``<|im_end|>``."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<|pad|>",
        bos_token=None,
        unk_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_rows: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for a CPU test; ``vocab_rows`` pads the embedding."""
    common = dict(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    # Llama, because AutoTokenizer keeps a saved character-level tokenizer as it is for Llama
    # folders, while for Qwen2 folders it swaps in Qwen2Tokenizer and its own pre-tokenizer.
    config = LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(
    folder: str | Path, tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel
) -> Path:
    """Save model and tokenizer as one Hugging Face folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fit_tiny(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised next-token training of ``model`` on ``texts`` (each ended with EOS), full
    batch; returns the loss per step. Makes a tiny teacher with something worth distilling."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token
    enc = tokenizer([t + eos for t in texts], add_special_tokens=False, padding=True,
                    return_tensors="pt")  # fmt: skip
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
