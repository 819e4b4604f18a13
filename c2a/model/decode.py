"""Autoregressive generation with a pre-allocated KV cache: prefill the prompt, then one token per step.

    generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None) -> new ids
    generate_batch(model, prompts, ...) -> new ids per prompt (prompts left-padded into one batch)

Greedy at temperature 0; otherwise nucleus sampling (Holtzman et al. 2019) from a seedable generator.
`stop_ids=None` stops at the model's own EOS (`model.cfg.eos_token_id`, one id or several). The returned
ids are the new tokens only, ending with the stop token when one was produced (as HF's `generate` returns
them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from c2a.model.llama import KVCache, Llama


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature < 0.0 or not 0.0 < top_p <= 1.0:
        # top_p = 0 would keep no token at all and multinomial would fail on an all-zero row
        raise ValueError(
            f"generate: temperature must be >= 0 and top_p in (0, 1], got temperature={temperature}, top_p={top_p}"
        )
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: Llama, prompts: Sequence[Sequence[int]], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the left-padded prompts through the model into `cache`. Returns (last logits [B, V], the
    next position id of each row [B])."""
    device = cache.valid.device
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        cache.valid[b, P - len(p) : P] = True
    position_ids = (cache.valid[:, :P].long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0
    logits = model(ids, position_ids=position_ids, cache=cache)[:, -1]
    return logits, position_ids[:, -1] + 1


def decode_one_token(model: Llama, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Appends `token` [B] at `position` [B]; returns the next logits [B, V]."""
    cache.valid[:, cache.length] = True
    return model(token[:, None], position_ids=position[:, None], cache=cache)[:, -1]


@torch.no_grad()
def generate_batch(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt; rows that hit a stop id stop growing while the others go on.

    `vocab_size` (the tokenizer's) limits the choice to ids below it, for a model whose vocabulary is
    padded past its tokenizer's (the trainer accepts any model vocab_size >= the tokenizer's): an id the
    tokenizer does not have cannot be decoded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (start it with BOS)")
    if vocab_size is not None and not 0 < vocab_size <= model.cfg.vocab_size:
        raise ValueError(f"generate: vocab_size must be in [1, {model.cfg.vocab_size}] (the model's), got {vocab_size}")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if stop_ids is None:
        stop_ids = model_eos_ids(model)
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    cache = KVCache.allocate(
        model.cfg, len(prompts), max(len(p) for p in prompts) + max_new_tokens, param.device, param.dtype
    )
    logits, position = prefill(model, prompts, cache)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=param.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=param.device)
    out = []
    for step in range(max_new_tokens):
        if vocab_size is not None:
            logits = logits[:, :vocab_size]  # [B, vocab_size]: the ids past it have no piece
        token = sample(logits, temperature, top_p, generator)
        token = torch.where(done, stops[0] if len(stops) else token, token)  # finished rows emit padding
        out.append(token)
        done |= torch.isin(token, stops)
        # one host sync per token: stop as soon as every row is done
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_one_token(model, token, position, cache)
        position = position + 1
    tokens = torch.stack(out, dim=1).tolist()  # [B, steps]
    return [_until_stop(row, stop_ids) for row in tokens]


def model_eos_ids(model: Llama) -> tuple[int, ...]:
    """The model's EOS ids (config.json's eos_token_id: one, several, or none)."""
    eos = model.cfg.eos_token_id
    return () if eos is None else eos if isinstance(eos, tuple) else (eos,)


def _until_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row


def generate(
    model: Llama,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """New token ids for one prompt (greedy by default); `vocab_size` as in generate_batch."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_p, stop_ids, seed, vocab_size)[0]
