"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear plus a trained
low-rank update, y = x·Wᵀ + s · (dropout(x)·Aᵀ)·Bᵀ, with A [r, in] and B [out, r].

B starts at zero (the model starts as the base) and A as PEFT initialises it, kaiming_uniform(a=√5), i.e.
U(-1/√in, 1/√in); s = α/r, or α/√r with rank-stabilised LoRA (Kalajdzievski 2023). These are PEFT's
definitions (peft.tuners.lora.layer.Linear), so an adapter trained here is PEFT's adapter.

The frozen weight is a parameter with requires_grad=False: autograd's linear backward then asks only for dX,
so no weight-gradient GEMM is computed and thrown away (6 -> 4 FLOPs per weight per token of a frozen
linear). Everything else of the model (embedding, norms, output head) is frozen too; a tied head stays one
frozen parameter. Parameter names keep Meta's: `layers.N.attention.wq.weight` is the base weight, and
`...wq.lora_A`, `...wq.lora_B` the adapter, so checkpoints and exports read the base as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from c2a.model.llama import Llama, init_lora_parameter

# the linears LoRA may adapt, by their module path inside a TransformerBlock
LORA_MODULES: dict[str, str] = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRALinear(nn.Module):
    """A bias-free linear with a frozen `weight` [out, in] and trained `lora_A` [r, in], `lora_B` [out, r]."""

    def __init__(self, weight: nn.Parameter, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        weight.requires_grad_(False)
        self.weight = weight
        self._add_adapters(weight.shape, weight.device, rank, scale, dropout)

    def _add_adapters(
        self, shape: tuple[int, int], device: torch.device, rank: int, scale: float, dropout: float
    ) -> None:
        """A and B, registered after the base weight, so that named_parameters yields the base first (the export
        merges in that order; QLoRA's export reorders its own, c2a.train.lora_run.dequantized_stream)."""
        out_features, in_features = shape
        # fp32 masters whatever the base's dtype (bf16 on GPU): the optimizer steps these
        kw = {"device": device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if device.type != "meta":
            init_lora_parameter(self.lora_A, "lora_A")
            init_lora_parameter(self.lora_B, "lora_B")

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as the forward uses it (QLoRA's quantised base overrides it and `base_forward`)."""
        return self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x · Wᵀ with the frozen base (QLoRA's quantised base overrides it to save only its codes)."""
        return F.linear(x, self.base_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # [..., r]
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s·B·A [out, in] in fp32: what merging adds to the base weight."""
        return lora_delta(self.lora_A, self.lora_B, self.scale)

    def extra_repr(self) -> str:
        (out_features, in_features), r = self.lora_B.shape[0], self.lora_A.shape[1], self.lora_A.shape[0]
        return f"in={in_features}, out={out_features}, r={r}, scale={self.scale:g}"


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    return (lora_B.float() @ lora_A.float()) * scale


def is_lora_parameter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def apply_lora(
    model: Llama, targets: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False
) -> Llama:
    """In place: each target linear (c2a names, wq ... w3) of every block becomes a LoRALinear around its own
    weight, and every other parameter is frozen. Works on the meta device (then init_weights or the trainer
    fills A and B) and on a loaded model (A and B initialised here)."""
    unknown = sorted(set(targets) - set(LORA_MODULES))
    if unknown or rank <= 0:
        raise ValueError(
            f"apply_lora: rank must be positive and targets among {list(LORA_MODULES)}, got {rank}, {unknown}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    scale = lora_scale(alpha, rank, rslora)
    for block in model.layers:
        for target in targets:
            parent_path, _, attr = LORA_MODULES[target].rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, attr)
            setattr(parent, attr, LoRALinear(linear.weight, rank, scale, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of a model by its module name (`layers.0.attention.wq`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: Llama) -> Llama:
    """In place: each LoRALinear becomes a plain linear holding W + s·B·A (computed in fp32, stored in W's
    dtype), so the model is a plain Llama again, with every parameter trainable as a loaded model's is."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        w = layer.weight
        merged = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        merged.weight.copy_((w.float() + layer.delta_weight()).to(w.dtype))
        setattr(model.get_submodule(parent_name), attr, merged)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
