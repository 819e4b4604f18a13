"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA adapters around a frozen base held in NF4.

Each adapted block linear keeps its base weight [out, in] as an NF4Linear (`<linear>.base`: block-major uint8
codes and 8-bit absmaxes as frozen parameters, the double-quant scales as buffers; c2a.model.quantized) and
its fp32 `lora_A` / `lora_B` as LoRA does. Forward: y = x · deq(W)ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ, deq(W) in
x's dtype (the compute dtype); the backward dequantizes W again for dX, so only the codes (0.5 bytes a weight,
not the compute dtype's 2) are held between the two. Embedding, norms and head stay in the compute dtype.

The codes are bitsandbytes' (`quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`),
so deq(W) is bit-equal to what PEFT + bitsandbytes trains against; `quantization_record` is the record of that
format that a QLoRA export writes beside its adapter (`QUANTIZATION_FILE`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from c2a.config import LORA_TARGETS
from c2a.kernels.nf4 import BLOCK, SCALE_BLOCK
from c2a.model.llama import Llama
from c2a.model.lora import LoRALinear, lora_layers
from c2a.model.quantized import NF4Linear

QUANTIZATION_FILE = "quantization.json"


class QLoRALinear(LoRALinear):
    """A LoRALinear whose frozen base is an NF4Linear (`base`) instead of a `weight` parameter."""

    def __init__(
        self, weight: torch.Tensor, rank: int, scale: float, dropout: float = 0.0, hf_rotary_heads: int = 0
    ) -> None:
        torch.nn.Module.__init__(self)
        out_features, in_features = weight.shape
        if weight.device.type == "meta":  # storage comes later (to_empty), filled by the trainer's materialize
            self.base = NF4Linear(in_features, out_features, device=weight.device, hf_rotary_heads=hf_rotary_heads)
        else:
            self.base = NF4Linear.from_weight(weight.detach(), hf_rotary_heads=hf_rotary_heads)
        self._add_adapters(weight.shape, weight.device, rank, scale, dropout)

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized base [out, in] (needs the unsharded codes): what the adapters train against."""
        return self.base.dequantized(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


def quantize_lora_bases(model: Llama) -> Llama:
    """In place: every LoRALinear becomes a QLoRALinear around its own base weight quantized to NF4 (a meta
    model gets empty NF4 storage; q and k in HF's row order, see c2a.model.quantized); its adapters move over
    as they are."""
    heads = {"wq": model.cfg.n_heads, "wk": model.cfg.n_kv_heads}
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        q = QLoRALinear(layer.weight, layer.lora_A.shape[0], layer.scale, hf_rotary_heads=heads.get(attr, 0))
        q.lora_A, q.lora_B, q.dropout = layer.lora_A, layer.lora_B, layer.dropout
        setattr(model.get_submodule(parent_name), attr, q)
    return model


def nf4_bases(model: torch.nn.Module) -> dict[str, NF4Linear]:
    """Each QLoRALinear's NF4 base, by the name of the weight it holds (`layers.0.attention.wq.weight`)."""
    return {f"{name}.weight": m.base for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def quantization_record(compute_dtype: torch.dtype, targets: tuple[str, ...]) -> dict[str, object]:
    """What a QLoRA adapter was trained against, in bitsandbytes' terms (BitsAndBytesConfig's names); `targets`
    are the quantized linears in c2a's names (wq ... w3), recorded in PEFT's."""
    peft_names = {meta: peft for peft, meta in LORA_TARGETS.items()}
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_blocksize": BLOCK,
        "bnb_4bit_use_double_quant": True,
        "double_quant_blocksize": SCALE_BLOCK,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "quantized_modules": sorted(peft_names[t] for t in targets),
        "note": "the adapter was trained against these linears quantized so (bit-equal to bitsandbytes' "
        "quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=True)) and dequantized to the "
        "compute dtype; merge it into that dequantized base (final/ holds the merge), not into the original weights",
    }


def write_quantization(directory: Path, compute_dtype: torch.dtype, targets: tuple[str, ...]) -> Path:
    """`directory`/quantization.json: `quantization_record`, beside adapter_config.json (PEFT's loaders warn
    about keys of their config they do not know, so the record is a file of its own)."""
    path = directory / QUANTIZATION_FILE
    path.write_text(json.dumps(quantization_record(compute_dtype, targets), indent=2) + "\n")
    return path
