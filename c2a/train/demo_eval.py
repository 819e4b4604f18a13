"""The demo task's held-out exact match, before and after training (data.path = "demo", eval.demo_accuracy)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2a.config import LlamaConfig, TrainConfig, resolve_dtype
from c2a.inference import answers, demo_exact_match
from c2a.model.llama import Llama
from c2a.train.export import gather_model
from c2a.train.metrics import add_to_last_record
from c2a.train.parallel import Dist
from c2a.train.run_data import RunData

log = logging.getLogger("c2a")


def evaluate_demo(
    model: Llama, model_cfg: LlamaConfig, data: RunData, cfg: TrainConfig, d: Dist, when: str
) -> dict[str, Any] | None:
    """Collective: greedy exact match on the demo's held-out split (as `python -m c2a.eval --data demo`
    computes it), run on rank 0 with a gathered copy of the model on its training device: fp32 on a CPU, the
    run's compute dtype on a GPU (bf16 by default, as c2a.eval's default there). On the training device,
    because a CPU copy of a GPU run's model would generate on the CPU, where C2A_KERNELS=triton cannot run."""
    dtype = torch.float32 if d.device.type == "cpu" else resolve_dtype(cfg.train.dtype, d.device)
    copy = gather_model(model, model_cfg, dtype, d.device)
    result = None
    if copy is not None:
        start = time.perf_counter()
        records = data.heldout[: cfg.eval.max_examples]
        result = demo_exact_match(
            records, answers(copy.eval(), data.tokenizer, records, cfg.eval.max_new_tokens, batch_size=128)
        )
        result["seconds"] = time.perf_counter() - start
        log.info(
            "demo held-out exact match %s: %.1f%% of %d (%.1f s)",
            when,
            100 * result["accuracy"],
            result["examples"],
            result["seconds"],
        )
    dist.barrier()
    return result


def record_demo(out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Rank 0: the before / after exact match into metrics.jsonl's last record (the run's last step)."""
    add_to_last_record(
        out, {"demo_exact_match_before": before["accuracy"], "demo_exact_match_after": after["accuracy"]}
    )
