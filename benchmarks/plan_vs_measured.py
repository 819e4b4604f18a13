"""The planner's peak for benchmarks/train_throughput.py's c2a side against the peak it measured.

    python benchmarks/plan_vs_measured.py WORK/train/train_throughput.json

gpu_check.sh runs it after its train stage; it writes plan_vs_measured.json beside the benchmark's JSON and
logs one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from c2a.config import LlamaConfig
from c2a.plan.memory import Workload, plan_memory

log = logging.getLogger("c2a.plan")


def compare_benchmark(path: str | Path) -> dict[str, Any]:
    """The planner's peak for each of the benchmark's c2a sides (one rank, packed rows, with the settings the
    side ran: its micro-batch, gather_once, reduce_once, fp8, activation checkpointing) against the peak it
    measured: torch.cuda.max_memory_allocated on CUDA, RSS on CPU (not comparable: the runtime is in it).
    Writes plan_vs_measured.json beside the benchmark's JSON: {side: comparison}; returns the c2a side's."""
    bench = json.loads(Path(path).read_text())
    results = {
        name: compare_side(bench["setup"], side) for name, side in bench["sides"].items() if name.startswith("c2a")
    }
    out = Path(path).with_name("plan_vs_measured.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results.get("c2a") or next(iter(results.values()), {})


def compare_side(s: dict[str, Any], side: dict[str, Any]) -> dict[str, Any]:
    model = LlamaConfig(
        dim=s["dim"],
        n_layers=s["n_layers"],
        n_heads=s["n_heads"],
        n_kv_heads=s["n_kv_heads"],
        vocab_size=s["vocab_size"],
        max_seq_len=max(4096, s["seq_len"]),
    )
    cuda = s["device"].startswith("cuda")
    accum = re.search(r"accumulation (\d+)", side["batching"])
    ran = side.get("settings", {})  # the side's train settings as resolved (older JSON: the defaults)
    w = Workload(
        model,
        ran.get("micro_batch", s["rows_per_micro"]),
        s["seq_len"],
        trained_fraction=0.5,
        packed=True,
        ranks=1,
        compute_bytes=2 if s["dtype"] == "bf16" else 4,
        backend=side.get("kernels", "triton" if cuda else "torch"),
        cuda=cuda,
        activation_checkpointing=ran.get("activation_checkpointing", "none"),
        ac_blocks=ran.get("ac_blocks", 0),
        accumulation=int(accum.group(1)) if accum else 1,
        gather_once=ran.get("gather_once", False),
        reduce_once=ran.get("reduce_once", False),
        fp8=ran.get("fp8", False),
    )
    p = plan_memory(w)
    predicted = (p.peak if cuda else p.peak_combined) / 2**20
    result = {
        "predicted_peak_mib": round(predicted, 1),
        "measured_peak_mib": side["peak_memory_mib"],
        "measured": "torch.cuda.max_memory_allocated" if cuda else "RSS (includes the runtime: not comparable)",
        "ratio": round(predicted / side["peak_memory_mib"], 3),
        "peak_phase": p.peak_phase,
        "per_rank_bytes": p.as_dict(),
    }
    log.info(
        "c2a.plan, %s: predicted peak %.0f MiB, measured %.0f MiB (%s): ratio %.3f",
        side.get("side", "c2a"),
        predicted,
        side["peak_memory_mib"],
        result["measured"],
        result["ratio"],
    )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    compare_benchmark(sys.argv[1])
