"""A frozen linear layer whose weight is held in NF4 (QLoRA's 4-bit format, c2a/kernels/nf4.py).

Storage, per weight [out, in] of n = out·in elements (blocks = ceil(n / 64)):
  codes    uint8 [blocks, 32]   parameter, frozen: two 4-bit codes a byte
  qabsmax  uint8 [blocks]       parameter, frozen: each block's absmax in 8 bits
  absmax2  fp32 [ceil(blocks / 256)], offset fp32 []: buffers, the absmaxes' second-level scale and mean
0.5 bytes a weight + 1 byte per 64 + 4 per 16,384 (plan.memory.nf4_bytes). Both parameters are block-major, so
FSDP2's dim-0 sharding gives each rank whole blocks and no rank holds the whole base at rest; FSDP2 gathers
them in uint8 (it casts only floating-point parameters to its param_dtype). The scales stay buffers: fp32
parameters would be cast to the compute dtype by FSDP2's mixed precision, and they are 1/4096 of the codes.

Forward: y = x · Wᵀ with W dequantized to x's dtype; backward: dx = dy · W with W dequantized again. Only the
quantized weight is saved between the two (a [out, in] weight in the compute dtype is 4x its codes), and the
weight gets no gradient: it is the frozen base that LoRA adapters (or nothing) train around.

A q or k projection (`hf_rotary_heads` > 0) holds the codes of its rows in HF's rotate-half order, the layout
transformers (and so bitsandbytes under PEFT) quantizes: row order decides which absmaxes share a second-level
scale, so quantizing Meta's order would give other weights. The dequantized weight's rows are put back in
Meta's order (c2a.model.weights.from_hf_rotary) before the matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from c2a.kernels import dequantize_nf4
from c2a.kernels.nf4 import BLOCK, BYTES_PER_BLOCK, SCALE_BLOCK, NF4Weight, quantize_nf4
from c2a.model.weights import from_hf_rotary, to_hf_rotary


def _weight(codes, qabsmax, absmax2, offset, shape, heads, dtype):
    w = dequantize_nf4(codes, qabsmax, absmax2, offset, shape, dtype)
    return from_hf_rotary(w, heads) if heads else w


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, qabsmax, absmax2, offset, shape, heads):
        ctx.save_for_backward(codes, qabsmax, absmax2, offset)
        ctx.shape, ctx.heads = shape, heads
        return x @ _weight(codes, qabsmax, absmax2, offset, shape, heads, x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        codes, qabsmax, absmax2, offset = ctx.saved_tensors
        dx = dy @ _weight(codes, qabsmax, absmax2, offset, ctx.shape, ctx.heads, dy.dtype)
        return dx, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """y = x · Wᵀ, W [out_features, in_features] held in NF4 and never trained. Build one from a weight with
    `NF4Linear.from_weight`; `dequantized(dtype)` is the weight a LoRA adapter is trained against."""

    def __init__(
        self, in_features: int, out_features: int, device: torch.device | str | None = None, hf_rotary_heads: int = 0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.hf_rotary_heads = hf_rotary_heads  # > 0: codes of the rows in HF's order, for this many heads
        blocks = -(-in_features * out_features // BLOCK)
        codes = torch.zeros(blocks, BYTES_PER_BLOCK, dtype=torch.uint8, device=device)
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.qabsmax = nn.Parameter(torch.zeros(blocks, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax2", torch.zeros(-(-blocks // SCALE_BLOCK), device=device))
        self.register_buffer("offset", torch.zeros((), device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, name: str = "weight", hf_rotary_heads: int = 0) -> NF4Linear:
        """Quantizes `weight` [out, in] (fp32, bf16 or fp16); `name` is how errors refer to it."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear: {name} must be a matrix [out, in], got shape {tuple(weight.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], device=weight.device, hf_rotary_heads=hf_rotary_heads)
        layer.load_quantized(weight, name)
        return layer

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, name: str = "weight") -> NF4Weight:
        """`weight` [out, in] (Meta's row order) quantized as this layer stores it, unsharded."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"NF4Linear: {name} has shape {tuple(weight.shape)}, the layer holds {self.shape}")
        if self.hf_rotary_heads:
            weight = to_hf_rotary(weight, self.hf_rotary_heads)
        return quantize_nf4(weight, name)

    @torch.no_grad()
    def load_quantized(self, weight: torch.Tensor, name: str = "weight") -> None:
        """Quantizes `weight` into this layer's (unsharded) storage."""
        q = self.quantize(weight, name)
        for dst, src in ((self.codes, q.codes), (self.qabsmax, q.qabsmax), (self.absmax2, q.absmax2)):
            dst.copy_(src)
        self.offset.copy_(q.offset)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`: what the forward multiplies by (bit-equal to bitsandbytes'
        dequantize_4bit of the same weight). Needs the unsharded parameters (inside FSDP2's forward or
        `unshard()`)."""
        return self.dequantize(self.codes, self.qabsmax, dtype)

    def dequantize(self, codes: torch.Tensor, qabsmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] from these full codes and absmaxes (e.g. gathered from shards) and this layer's
        second-level scales."""
        return _weight(codes, qabsmax, self.absmax2, self.offset, self.shape, self.hf_rotary_heads, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Linear.apply(
            x, self.codes, self.qabsmax, self.absmax2, self.offset, self.shape, self.hf_rotary_heads
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"
