"""FLOPs of a training step, and the GPUs' peaks they are measured against (MFU).

Counted as the model does the work (`c2a.model.llama`), so the trainer's logged MFU and the planner's run
time (`c2a.plan`) divide the same numbers.
"""

from __future__ import annotations

import torch

from c2a.config import LlamaConfig

# Dense bf16 tensor-core peaks (NVIDIA datasheets, FLOP/s without sparsity), looked up by a substring of the
# device name, the first match winning: the PCIe and NVL H100s run lower clocks and fewer SMs than the SXM
# part the plain "H100" means.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s for MFU; None off CUDA or for a card not in the table."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def matmul_flops_per_token(cfg: LlamaConfig) -> int:
    """Forward + backward FLOPs per token of every weight matmul: 6 per parameter (2 forward, 4 backward),
    the output head included, the embedding lookup (no matmul) excluded."""
    return 6 * (cfg.num_params - cfg.vocab_size * cfg.dim)


def lora_matmul_flops_per_token(cfg: LlamaConfig, adapter_params: int) -> int:
    """With LoRA: 4 FLOPs per frozen weight (forward and dX; frozen weights get no dW GEMM) and 6 per adapter
    weight (`adapter_params` in all), the embedding lookup excluded."""
    return 4 * (cfg.num_params - cfg.vocab_size * cfg.dim) + 6 * adapter_params


def attention_flops(cfg: LlamaConfig, doc_lengths_sq_sum: int) -> int:
    """Forward + backward FLOPs of causal attention, counted per document: q·kᵀ and p·v are 2·L·L·D
    each per layer, halved by the causal mask, and the backward costs twice the forward."""
    return 3 * cfg.n_layers * 2 * doc_lengths_sq_sum * cfg.dim
