"""Layer pruning keeps the chosen layers and a working KV cache."""

from __future__ import annotations

import pytest
import torch

from kdrl.prune import prune_decoder_layers
from kdrl.tiny import char_tokenizer, tiny_causal_lm


def test_pruned_model_keeps_layers_and_generates_with_cache():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden=32, layers=4, seed=0).eval()
    pruned = prune_decoder_layers(model, [0, 3])
    assert pruned.config.num_hidden_layers == 2 and len(model.model.layers) == 4
    assert torch.equal(
        pruned.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight
    )
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    with torch.no_grad():
        cached = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("keep", [[], [1, 0], [0, 4], [-1, 2]])
def test_bad_layer_lists_are_rejected(keep):
    model = tiny_causal_lm(char_tokenizer(), hidden=16, layers=4)
    with pytest.raises(ValueError, match="keep must be"):
        prune_decoder_layers(model, keep)
