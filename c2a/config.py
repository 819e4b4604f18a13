"""Typed configuration: model presets (Meta's params.json names). Dataclasses only, no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-2 hyper-parameters under the field names of Meta's params.json.

    `n_kv_heads=None` means multi-head attention (n_kv_heads = n_heads). `ffn_hidden_dim=None` derives
    the feed-forward width with Meta's formula from `dim`, `ffn_dim_multiplier` and `multiple_of`; an
    int is taken as given (HF's `intermediate_size`). Both are resolved in `__post_init__`, so a
    constructed config always holds concrete numbers.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    ffn_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden_dim is None:
            object.__setattr__(self, "ffn_hidden_dim", meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier))
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "ffn_hidden_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif (self.dim // self.n_heads) % 2:
                problems.append(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary pairs")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_params(self) -> int:
        """Parameter count: embedding + untied output head + blocks + final norm."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * (self.n_heads * hd) * 2 + self.dim * (kv * hd) * 2
        ffn = 3 * self.dim * self.ffn_hidden_dim
        return 2 * self.vocab_size * self.dim + self.n_layers * (attn + ffn + 2 * self.dim) + self.dim

    @classmethod
    def from_name(cls, name: str) -> LlamaConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4·dim, scaled, rounded up to a multiple (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, LlamaConfig] = {
    # Meta's params.json for the three Llama-2 sizes (FFN 11008 / 13824 / 28672 by the formula).
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # The bundled demo task's model: small enough to fine-tune on 2 CPU cores in minutes. Its vocabulary
    # is the demo SentencePiece tokenizer's (c2a/data/assets/demo_tokenizer.model).
    "demo": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, max_seq_len=512),
}
