"""Layer pruning: a student made by keeping some decoder layers of a teacher ("prune, then
distill to recover"). Works for decoder-only Hugging Face models that keep their blocks in
``model.model.layers`` (Llama, Qwen2/3, Mistral, SmolLM, ...)."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel


def prune_decoder_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the decoder layers ``keep`` (in that order); embeddings,
    final norm and head are shared weights copied as they are."""
    layers = model.model.layers
    if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= len(layers) or keep[0] < 0:
        raise ValueError(f"keep must be increasing layer indices in [0, {len(layers)}), got {keep}")
    pruned = copy.deepcopy(model)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in keep])
    for new_index, layer in enumerate(pruned.model.layers):
        # The KV cache is indexed by layer_idx: it must follow the new positions.
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [pruned.config.layer_types[i] for i in keep]
    return pruned
