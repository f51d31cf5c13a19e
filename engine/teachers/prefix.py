"""The token prefix every prompt of a teacher call shares, run once and reused (vLLM's prefix caching, by hand).

A context-distillation prompt is mostly shared text: the chat template's system part, the instructions,
the few-shot turns. The transformers teacher runs that prefix once, keeps its key/value cache, and lays
each batch out as [prefix][left padding][suffix] with the attention mask zero on the padding. transformers'
generate derives position ids from the mask's running sum, so each suffix starts at the prefix's length
whatever its padding, as in the uncached [padding][prefix][suffix] layout: greedy outputs are the same.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_PREFIX = 16  # shorter shared prefixes save less than one more forward and a cache copy per batch cost


def shared_prefix(encoded: list[list[int]]) -> int:
    """Length of the longest token prefix every prompt shares, leaving each prompt at least one token of
    its own (the first generated token comes from the last prompt token's logits). 0 for a single prompt."""
    if len(encoded) < 2:
        return 0
    first = encoded[0]
    n = min(len(ids) for ids in encoded) - 1
    for ids in encoded[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
        if n <= 0:
            return 0
    return n


def cacheable(model) -> bool:
    """Whether the model's cache is plain full attention in every layer: a sliding window, a chunked or a
    recurrent layer does not hold a prefix that later tokens can simply continue from."""
    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """The key/value cache of one shared prefix; `for_batch(n)` gives generate a fresh cache of n copies."""

    def __init__(self, model, ids: list[int]):
        self.ids = ids
        self.config = model.config
        device = next(model.parameters()).device
        # logits_to_keep=1: the prefix's own logits are never read, and all of them would be [len, vocab].
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in out.cache.layers]

    def for_batch(self, n: int) -> DynamicCache:
        # DynamicLayer.update concatenates, so each batch's cache holds its own tensors: generation appends
        # to those, never to the prefix's.
        return DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.layers],
                            config=self.config)
