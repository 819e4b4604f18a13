"""Training metrics: an honest FLOP count, MFU, metrics.jsonl, optional TensorBoard, and the progress bar."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from c2a.config import LlamaConfig

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity).
# Dense bf16 tensor-core peaks (NVIDIA datasheets), looked up by a substring of the device name, the first
# match winning: the PCIe and NVL H100s run lower clocks and fewer SMs than the SXM part the plain "H100" means.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}  # fmt: skip


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


def attention_flops(cfg: LlamaConfig, doc_lengths_sq_sum: int) -> int:
    """Forward + backward FLOPs of causal attention, counted per document: q·kᵀ and p·v are 2·L·L·D
    each per layer, halved by the causal mask, and the backward costs twice the forward."""
    return 3 * cfg.n_layers * 2 * doc_lengths_sq_sum * cfg.dim


class MetricsWriter:
    """metrics.jsonl (one object per logged step, appended, so a resumed run continues the file) and
    optional TensorBoard. Rank 0 only.

    `after_step` is the step the run starts from (its checkpoint's, or 0): records of later steps are
    dropped from the file (and from TensorBoard), since they were logged by a run that died before its
    next checkpoint and are about to be run, and logged, again."""

    def __init__(self, out_dir: Path, tensorboard: bool, after_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= after_step]
            if len(kept) != len(lines):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(self.path)
                log.info("metrics.jsonl: dropped %d records after step %d (re-run from the checkpoint)", len(lines) - len(kept), after_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=after_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm with ETA on rank 0; a no-op elsewhere or when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
