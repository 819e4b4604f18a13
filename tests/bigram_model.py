"""A tiny Llama whose greedy next token depends on the current token only, for tests of generation paths
whose answer must be known in advance (CLI output, stop tokens, exact-match scoring)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from c2a.config import LlamaConfig
from c2a.model import Llama


def bigram_llama(cfg: LlamaConfig, next_token: Mapping[int, Iterable[int]], seed: int) -> Llama:
    """`next_token[t]`: the input tokens after which the model says t. The blocks add nothing (wo = w2 = 0),
    so the final hidden state of a position is the normed embedding h of its token; the head's row of t is
    2 · the sum of h over t's inputs, so t's logit there is about 2 · |h|² = 2 · D, against h·h' (std √D) or
    noise for any other token."""
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, 1.0)
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        h = model.norm(model.tok_embeddings.weight)  # [V, D]: the final hidden state of each input token
        w = model.output.weight
        w.normal_(0.0, 0.02)
        for target, inputs in next_token.items():
            w[target] = 2 * sum(h[s] for s in inputs)
    return model
