"""The Llama family's network (Llama-2, Touvron et al. 2023; Llama-3.x), bottom-up: RMSNorm, rotary, attention,
feed-forward, block, model.

Shapes: B batch, T sequence, D model dim, H query heads, K key/value heads, Hd head dim (D / H),
F feed-forward width, V vocabulary.

Parameter names and the rotary layout are Meta's (tok_embeddings, layers.N.attention.wq, ...), so a
Meta state dict loads as it is. The fused ops come from c2a.kernels, which picks Triton or torch.
The model holds no distributed, optimizer or checkpoint code: the trainer applies those from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from c2a.config import LlamaConfig
from c2a.kernels import (
    RopeScaling,
    add_rms_norm,
    apply_rotary,
    causal_attention,
    linear_cross_entropy,
    rms_norm,
    silu_mul,
)
from c2a.kernels.attention import Documents
from c2a.kernels.rotary import Rotation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Pre-allocated keys and values of every layer, for generation (prefill, then a token at a time).

    `k`, `v`: [n_layers, B, S, K, Hd]. `valid[b, s]` says slot s of row b holds a real token (left padding
    of a batch of prompts does not). `length` slots are filled, the same number in every row.
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls, cfg: LlamaConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
        )


@dataclass
class LayerKV:
    """One layer's view of a KVCache for one forward call: new keys go to slots [start, start + T)."""

    k: torch.Tensor  # [B, S, K, Hd]
    v: torch.Tensor  # [B, S, K, Hd]
    start: int
    mask: torch.Tensor  # [B, 1, T, start + T] bool: which cached slots each new query may attend to


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = rope_scaling(cfg)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | Rotation,
        documents: Documents | None,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, Hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Hd]
        q, k = apply_rotary(q, k, position_ids, self.rope_theta, self.rope_scaling)
        if cache is None:
            o = causal_attention(q, k, v, documents)  # [B, T, H, Hd]
        else:  # generation: attend over every cached slot the mask allows
            end = cache.start + T
            cache.k[:, cache.start : end] = k
            cache.v[:, cache.start : end] = v
            q, k, v = (t.transpose(1, 2) for t in (q, cache.k[:, :end], cache.v[:, :end]))  # [B, heads, *, Hd]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=cache.mask, enable_gqa=self.n_heads != self.n_kv_heads
            )
            o = o.transpose(1, 2)  # [B, T, H, Hd]
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | Rotation,
        documents: Documents | None,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        # h = x + attention(...) and ffn_norm(h) in one op: one pass over the residual stream instead of two
        attn = self.attention(self.attention_norm(x), position_ids, documents, cache)
        h, h_normed = add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.feed_forward(h_normed)


class Llama(nn.Module):
    """A Llama model, with an untied output head (Llama-2), or tied (`cfg.tie_word_embeddings`): then `output.weight` IS
    `tok_embeddings.weight`, one parameter, listed once by `named_parameters()` (as tok_embeddings.weight).

    `Llama(cfg)` is initialised and ready on the current default device. Built under
    `torch.device("meta")`, it holds no storage: shard it, `to_empty()` it, then call `init_weights()`
    (or load pretrained weights into it).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if self.output.weight.device.type != "meta":
            self.init_weights()

    def _apply(self, fn, recurse: bool = True):
        # .to() / .to_empty() give each module's parameter a new tensor where the storage changes (meta ->
        # cpu always does), which would split a tied head from the embedding: tie them again after.
        super()._apply(fn, recurse)
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Re-initialises every parameter in place by `init_parameter`'s rule."""
        for name, p in self.named_parameters():
            init_parameter(p, name, self.cfg, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
        cache: KVCache | None = None,
        num_trained: int | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; or, given `labels`, the loss as `loss()` computes it.

        The loss path lives in forward (not only in `loss()`) so that module hooks, FSDP2's unsharding
        among them, run for the output head too. With a `cache` (generation), the tokens are appended to
        it, attention spans the cache, and only the last position's logits are computed: [B, 1, V].
        """
        _check_inputs(input_ids, position_ids, labels)
        B, T = input_ids.shape
        # one document layout for every layer: its device index (Triton) or host spans (torch) are built
        # once per forward, by the first layer, and reused by the rest and by checkpoint recompute
        documents: Documents | None = Documents(position_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        rotation = Rotation(position_ids)  # likewise: the torch path's cos/sin tables, built by the first layer
        layer_caches: list[LayerKV | None] = [None] * len(self.layers)
        if cache is not None:
            documents = None
            layer_caches = [
                LayerKV(cache.k[i], cache.v[i], cache.length, _cache_mask(cache, T)) for i in range(len(self.layers))
            ]
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        for layer, layer_cache in zip(self.layers, layer_caches):
            h = layer(h, rotation, documents, layer_cache)
        if cache is not None:
            cache.length += T
            h = h[:, -1:]  # [B, 1, D]
        if labels is None:
            return self.output(self.norm(h))  # [B, T, V]
        h, labels = h.flatten(0, 1), labels.flatten()  # [B·T, D], [B·T]
        if weights is not None:
            return self._weighted_loss(h, labels, weights.flatten(), normalizer, num_trained)
        if num_trained is not None:
            h, labels = _first_trained_rows(h, labels, num_trained)
        elif not h.is_cuda:
            h, labels = _trained_rows(h, labels)
        return linear_cross_entropy(self.norm(h), self.output.weight, labels, normalizer)

    def _weighted_loss(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        normalizer: torch.Tensor | float | None,
        num_trained: int | None,
    ) -> torch.Tensor:
        """The loss head with per-row weights [B·T]: the same row selection as the unweighted path."""
        rows = torch.arange(labels.numel(), device=labels.device)
        if num_trained is not None:
            rows, labels = _first_trained_rows(rows, labels, num_trained)
        elif not h.is_cuda:
            rows, labels = _trained_rows(rows, labels)
        return linear_cross_entropy(self.norm(h[rows]), self.output.weight, labels, normalizer, weights[rows])

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
        num_trained: int | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not -100 (labels are already shifted).

        `normalizer` replaces the local count of trained targets as the divisor, so gradient
        accumulation and data-parallel ranks can all divide by the global count. The [B·T, V] logits are
        never materialised at once (c2a.kernels.linear_cross_entropy). `num_trained`, the number of labels
        that are not -100 when the caller knows it on the host (the data loader counts it), lets the final
        norm and the output head skip the untrained rows on any device without a host sync. `weights` [B, T]
        (fp32) weigh each target's loss (train.loss_weighting = "example"; c2a.train.weighting).
        """
        return self(
            input_ids,
            position_ids=position_ids,
            labels=labels,
            normalizer=normalizer,
            num_trained=num_trained,
            weights=weights,
        )


def rope_scaling(cfg: LlamaConfig) -> RopeScaling | None:
    """The config's Llama-3.1 rope scaling for the rotary op, or None for plain rope."""
    if not cfg.use_scaled_rope:
        return None
    return RopeScaling(cfg.rope_scaling_factor, cfg.low_freq_factor, cfg.high_freq_factor, cfg.original_max_seq_len)


@torch.no_grad()
def init_parameter(
    p: torch.Tensor, name: str, cfg: LlamaConfig, std: float = 0.02, generator: torch.Generator | None = None
) -> None:
    """Norm weights 1; other weights Normal(0, std), the two residual-branch outputs (wo, w2) with std
    scaled by 1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth (GPT-2, §2.3)."""
    if name.endswith(("lora_A", "lora_B")):
        init_lora_parameter(p, name, generator)
    elif name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        p.normal_(0.0, std / math.sqrt(2 * cfg.n_layers), generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_lora_parameter(p: torch.Tensor, name: str, generator: torch.Generator | None = None) -> None:
    """LoRA's adapters (c2a.model.lora) as PEFT initialises them: lora_A [r, in] kaiming_uniform_(a=√5), i.e.
    U(-1/√in, 1/√in); lora_B zeros, so the adapted model starts as the base."""
    if name.endswith("lora_A"):
        nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
    elif name.endswith("lora_B"):
        p.zero_()
    else:
        raise ValueError(f"init_lora_parameter: {name!r} is not a LoRA parameter")


def _trained_rows(h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the rows with a trained target, for the final norm and the output head: in instruction tuning
    the prompt is not trained (the demo trains ~30% of positions, Alpaca-like data about half), and the
    head is most of a small model's FLOPs (dim 256, vocab 32000: 8.2M of 11M parameters). When the caller
    gives no num_trained, and not on CUDA: finding the rows reads the labels on the host, a sync that costs
    more there than the ~2% of a 7B model's FLOPs it would save (`_first_trained_rows` needs no sync)."""
    keep = (labels != -100).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = keep.new_zeros(1)  # one ignored row: the loss is 0 and every gradient a defined 0
    return h[keep], labels[keep]


def _first_trained_rows(h: torch.Tensor, labels: torch.Tensor, num_trained: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_trained_rows` without reading the labels on the host: a stable sort of the rows by "ignored"
    puts the trained ones first, in order, and the host-known count says how many to keep, so the gather
    and every shape after it are known without a sync. On CUDA this takes the prompt rows (about half of
    Alpaca's positions) out of the output head's three GEMMs and its softmax pass."""
    if num_trained > labels.numel():
        raise ValueError(f"Llama: num_trained {num_trained} exceeds the {labels.numel()} labels")
    keep = torch.sort((labels == -100).to(torch.uint8), stable=True).indices[: max(num_trained, 1)]
    # with no trained target, one ignored row: the loss is 0 and every gradient a defined 0
    return h[keep], labels[keep]


def _cache_mask(cache: KVCache, T: int) -> torch.Tensor:
    """[B, 1, T, start + T]: query slot i sees valid key slots s <= i, and always itself, so a padding
    query never has an empty softmax (which would put NaN into the padded rows)."""
    start, end = cache.length, cache.length + T
    if end > cache.k.shape[2]:
        raise ValueError(f"KVCache: {end} positions do not fit the {cache.k.shape[2]} allocated")
    slots = torch.arange(end, device=cache.valid.device)
    query = slots[start:, None]  # [T, 1]
    mask = (slots[None, :] <= query) & cache.valid[:, None, :end]  # [B, T, end]
    return (mask | (slots[None, :] == query))[:, None]  # [B, 1, T, end]


def _check_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"Llama: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    for name, t in (("position_ids", position_ids), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"Llama: {name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
