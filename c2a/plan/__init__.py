"""Will a run fit, and how long will it take: `python -m c2a.plan --config FILE.toml --gpus N`.

`memory` holds the per-rank memory model (checked against torch's FSDPMemTracker in tests/test_plan.py);
`workload` resolves a training config into what a rank runs; `report` searches the settings that fit and
times the run. The planner reads config, model and data, never train (which asks it for its predicted peak).
"""

from __future__ import annotations

import torch

from c2a.config import DTYPES, LlamaConfig, TrainConfig, compute_dtype
from c2a.data.batching import ExampleDataset, MicroBatchLoader
from c2a.kernels import backend
from c2a.plan.memory import MemoryPlan, Workload, plan_memory
from c2a.plan.workload import lora_fields

__all__ = ["MemoryPlan", "Workload", "plan_memory", "predicted_peak_mb", "run_workload"]


def run_workload(
    cfg: TrainConfig, model: LlamaConfig, ranks: int, device: torch.device, dataset: ExampleDataset, accumulation: int
) -> Workload:
    """What one rank of this run does per micro-batch, as the planner counts it: train.micro_batch rows of
    data.max_len (packed) or of the longest example (padded), `accumulation` micro-batches a step."""
    counts = getattr(dataset, "manifest", {}).get("counts", {})
    trained = counts.get("trained_tokens", 0) / counts["tokens"] if counts.get("tokens") else 0.5
    t = cfg.train
    longest = int(dataset.lengths.max()) if len(dataset.lengths) else cfg.data.max_len
    seq_len = cfg.data.max_len if cfg.data.packing else min(cfg.data.max_len, longest)
    return Workload(
        model,
        t.micro_batch,
        seq_len,
        trained_fraction=trained,
        packed=cfg.data.packing,
        ranks=ranks,
        replicas=t.replicas,
        compute_bytes=compute_dtype(t, device).itemsize,
        backend=backend(device),
        cuda=device.type == "cuda",
        activation_checkpointing=t.activation_checkpointing,
        ac_every=t.ac_every,
        ac_blocks=t.ac_blocks,
        accumulation=accumulation,
        cpu_offload=t.cpu_offload,
        master_bytes=DTYPES[t.master_dtype].itemsize,
        reduce_bytes=DTYPES[t.reduce_dtype].itemsize,
        optimizer=t.optimizer,
        gather_once=t.gather_once,
        reduce_once=t.reduce_once,
        fp8=t.fp8,
        **lora_fields(cfg),
    )


def predicted_peak_mb(
    cfg: TrainConfig, model: LlamaConfig, ranks: int, device: torch.device, loader: MicroBatchLoader
) -> float:
    """The planner's per-rank peak for this run, in MiB, for metrics.jsonl beside the measured peak_memory_mb
    (torch.cuda.max_memory_allocated on CUDA: the same tensor bytes; on CPU the process's peak RSS, which also
    holds the Python runtime and torch's own buffers, so it reads higher)."""
    plan = plan_memory(run_workload(cfg, model, ranks, device, loader.dataset, loader.accum_steps))
    return round((plan.peak_combined if device.type == "cpu" else plan.peak) / 2**20, 1)
