"""The planner's answers for a config on a machine: per-rank memory, whether it fits, the settings that would,
the fewest GPUs, and the run's time at a stated MFU (what `python -m c2a.plan` prints)."""

from __future__ import annotations

import dataclasses
from typing import Any

from c2a.config import LlamaConfig, TrainConfig
from c2a.model.flops import attention_flops, lora_matmul_flops_per_token, matmul_flops_per_token
from c2a.plan.auto import resolve_for_machine
from c2a.plan.memory import MemoryPlan, Workload, block_params, lora_block_params, plan_memory
from c2a.plan.workload import (
    RESERVED_GIB,
    DataShape,
    GiB,
    Machine,
    accumulation,
    lora_fields,
    resolve_data,
    resolve_model,
    workload,
)


def usable_bytes(machine: Machine) -> float:
    return (machine.memory_gib - RESERVED_GIB) * GiB


def fits(plan: MemoryPlan, machine: Machine) -> bool:
    return plan.peak <= usable_bytes(machine)


def suggestions(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> list[dict[str, Any]]:
    """Settings that fit, fastest first: no offload before offload, less recompute before more, larger
    micro-batches first; and with plain FSDP, HSDP replicas (one per node) when they fit."""
    out = []
    t = cfg.train
    qlora = cfg.lora.quantize == "nf4"  # QLoRA is not supported with cpu_offload nor HSDP: not suggested
    for offload in (False,) if qlora else (False, True):
        for ac in ("none", "selective", "full"):
            for mb in sorted({t.micro_batch, *[m for m in (8, 4, 2, 1) if m < t.micro_batch]}, reverse=True):
                w = workload(
                    cfg, model, data, machine, activation_checkpointing=ac, micro_batch=mb, cpu_offload=offload
                )
                p = plan_memory(w)
                if fits(p, machine):
                    changed = dataclasses.replace(
                        cfg,
                        train=dataclasses.replace(t, micro_batch=mb, activation_checkpointing=ac, cpu_offload=offload),
                    )
                    out.append(
                        {
                            "train.micro_batch": mb,
                            "train.activation_checkpointing": ac,
                            "train.cpu_offload": offload,
                            "peak_gib": round(p.peak / GiB, 1),
                            "hours": round(run_time(changed, model, data, machine)["hours"], 1),
                        }
                    )
                    break
    if machine.nodes > 1 and t.replicas == 1 and not qlora:
        w = workload(cfg, model, data, machine, replicas=machine.nodes)
        p = plan_memory(w)
        if fits(p, machine):
            out.append(
                {
                    "train.replicas": machine.nodes,
                    "peak_gib": round(p.peak / GiB, 1),
                    "hours": round(run_time(cfg, model, data, machine)["hours"], 1),
                }
            )
    return out


def min_gpus(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> int | None:
    """The fewest GPUs (1, 2, 4, 8, then whole 8-GPU nodes) on which the config as it is fits."""
    for n in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256):
        m = dataclasses.replace(machine, gpus=n, nodes=max(1, n // 8))
        if fits(plan_memory(workload(cfg, model, data, m, replicas=1)), m):
            return n
    return None


def run_time(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> dict[str, Any]:
    """Hours of the whole run: FLOPs of every position trained on (6 per weight per token; with LoRA 4 per frozen
    weight, no dW, and 6 per adapter weight; plus causal
    attention per document, as c2a.train.metrics counts them), plus activation checkpointing's recompute,
    / (MFU x peak x GPUs). With cpu_offload, plus the host<->GPU copies and the host's AdamW step, which the
    GPU waits for (see `offload_seconds`)."""
    epochs = cfg.train.epochs
    mean = data.tokens / data.examples
    attention = attention_flops(model, round(data.examples * mean * mean))
    lora = Workload(model, 1, 1, **lora_fields(cfg))
    per_token = matmul_flops_per_token(model)
    if lora.lora:  # frozen weights: forward and dX only (4 of the 6 FLOPs a weight); the adapters all 6
        per_token = lora_matmul_flops_per_token(model, model.n_layers * lora_block_params(lora))
    flops = epochs * (data.tokens * per_token + attention)
    # activation checkpointing runs the checkpointed blocks' forward again: a third more of their work (their
    # forward is 2 of the 6 FLOPs a weight and 1 of the attention's 3 passes), not counted in MFU's model FLOPs
    w = Workload(
        model,
        cfg.train.micro_batch,
        cfg.data.max_len,
        activation_checkpointing=cfg.train.activation_checkpointing,
        ac_every=cfg.train.ac_every,
        ac_blocks=cfg.train.ac_blocks,
    )
    checkpointed = sum(w.checkpointed(i) for i in range(model.n_layers)) / model.n_layers
    block = block_params(model) + lora_block_params(lora)
    recompute = epochs * checkpointed * (data.tokens * 2 * model.n_layers * block + attention / 3)
    seconds = (flops + recompute) / (machine.mfu * machine.peak_flops * machine.gpus)
    result = {
        "epochs": epochs,
        "tokens": epochs * data.tokens,
        "trained_tokens": epochs * data.trained_tokens,
        "flops": flops,
        "recompute_flops": recompute,
        "mfu": machine.mfu,
        "mfu_source": machine.mfu_source,
        "compute_hours": seconds / 3600,
    }
    if cfg.train.cpu_offload:
        result["offload_hours"] = offload_seconds(cfg, model, data, machine) / 3600
        seconds += result["offload_hours"] * 3600
    result["hours"] = seconds / 3600
    return result


# Assumptions for cpu_offload's cost, not measurements: pinned host<->device copies at 25 GB/s a GPU (PCIe 5.0
# x16 is 64 GB/s a direction on paper; copies of many tensors, shared links and syncs take a good part of it),
# and the host's AdamW (torch's foreach on CPU tensors) moving 10 GB/s of state a GPU's process.
PCIE_BYTES_PER_S, HOST_ADAM_BYTES_PER_S = 25e9, 10e9


def offload_seconds(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> float:
    """cpu_offload's time: each micro-batch copies every fp32 shard to the GPU twice (the blocks are gathered
    again for the backward) and the fp32 gradient shards back (12 bytes a parameter of the shard); each
    optimizer step reads and writes the shard's weights, gradients and two moments on the host (about 28 bytes
    a parameter: 16 read, 12 written). With LoRA only the fp32 adapters move so; the frozen base's shards (in
    the compute dtype, c bytes a parameter) are copied to the GPU twice a micro-batch and nothing comes back."""
    w = workload(cfg, model, data, machine)
    trained = model.n_layers * lora_block_params(w) if w.lora else model.num_params
    frozen_bytes = 2 * w.compute_bytes * model.num_params if w.lora else 0
    shards = machine.gpus // cfg.train.replicas
    rows = data.tokens / cfg.data.max_len if cfg.data.packing else data.examples
    micro_batches = cfg.train.epochs * rows / (cfg.train.micro_batch * machine.gpus)
    steps = micro_batches / accumulation(cfg, data, machine.gpus, cfg.train.micro_batch)
    per_micro_batch = (12 * trained + frozen_bytes) / shards
    return micro_batches * per_micro_batch / PCIE_BYTES_PER_S + steps * 28 * trained / shards / HOST_ADAM_BYTES_PER_S


def plan(
    cfg: TrainConfig,
    machine: Machine,
    examples: int | None = None,
    mean_tokens: float | None = None,
    trained_fraction: float | None = None,
) -> dict[str, Any]:
    """Everything the CLI prints, as a dict (its --json output)."""
    model, model_source = resolve_model(cfg)
    data = resolve_data(cfg, examples, mean_tokens, trained_fraction)
    cfg, same_rows, chosen = resolve_for_machine(cfg, model, data, machine)
    w = workload(cfg, model, data, machine, **same_rows)
    p = plan_memory(w)
    variants, saved = {}, {}
    for ac in ("none", "selective", "full"):
        v = plan_memory(dataclasses.replace(w, activation_checkpointing=ac))
        variants[ac], saved[ac] = round(v.peak / GiB, 2), round(v.activations / GiB, 2)
    return {
        "model": {
            "source": model_source,
            "params": model.num_params,
            "dim": model.dim,
            "layers": model.n_layers,
            "vocab": model.vocab_size,
        },
        "data": dataclasses.asdict(data),
        "machine": dataclasses.asdict(machine),
        "workload": {k: v for k, v in dataclasses.asdict(w).items() if k != "model"},
        "per_rank_bytes": p.as_dict(),
        "peak_gib_by_activation_checkpointing": variants,
        "activations_gib_by_activation_checkpointing": saved,
        "usable_gib": round(usable_bytes(machine) / GiB, 1),
        "fits": fits(p, machine),
        "host_gib_per_node": round(p.host * machine.gpus / machine.nodes / GiB, 1),
        "auto": chosen,
        "fitting_settings": suggestions(cfg, model, data, machine),
        "min_gpus_as_configured": min_gpus(cfg, model, data, machine),
        "time": run_time(cfg, model, data, machine),
    }


def table(result: dict[str, Any]) -> str:
    p, w, t = result["per_rank_bytes"], result["workload"], result["time"]
    mach = result["machine"]
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    m = "fp32" if w.get("master_bytes", 4) == 4 else "bf16"  # the stored parameters' dtype
    lines = [
        f"model   {result['model']['source']}: {result['model']['params'] / 1e9:.2f}B parameters",
        f"data    {result['data']['source']}",
        f"run     {mach['gpus']} x {mach['name']} ({mach['memory_gib']:g} GB) on {mach['nodes']} node(s); micro-batch "
        f"{w['micro_batch']} x {w['seq_len']} tokens, accumulation {w['accumulation']}, activation checkpointing "
        f"{w['activation_checkpointing']}, cpu_offload {w['cpu_offload']}, shards {w['ranks'] // w['replicas']}",
        "",
        "per rank",
        (
            f"  {'parameters (base + adapters)':<30}{g(p['params'])}   frozen base "
            + ("with NF4 block linears (QLoRA)" if w.get("lora_nf4") else "in the compute dtype")
            + f", fp32 rank-{w['lora_rank']} adapters"
            + ("  (host)" if w["cpu_offload"] else "")
            if w["lora_rank"]
            else f"  parameters ({m} shard)       {g(p['params'])}" + ("  (host)" if w["cpu_offload"] else "")
        ),
        f"  {'gradients (adapters, fp32)' if w['lora_rank'] else f'gradients ({m} shard)':<30}{g(p['grads'])}"
        + ("  (host)" if w["cpu_offload"] else ""),
        "  "
        + (
            "optimizer (AdamW, 8-bit)"
            if w["optimizer"] == "adamw8bit"
            else f"optimizer (AdamW, {'fp32' if w['lora_rank'] else m})"
        ).ljust(30)
        + g(p["optimizer"])
        + ("  (host)" if w["cpu_offload"] else ""),
        f"  FSDP gathered at the peak     {g(p['fsdp'])}",
        f"  activations (saved)           {g(p['activations'])}",
        f"  loss head transient           {g(p['loss_head'])}",
        f"  peak (device)                 {g(p['peak'])}   at {p['peak_phase']}",
        "  by activation checkpointing:  "
        + ", ".join(
            f"{k}: activations {result['activations_gib_by_activation_checkpointing'][k]:.1f}, peak {v:.1f} GiB"
            for k, v in result["peak_gib_by_activation_checkpointing"].items()
        ),
        f"  fits in {result['usable_gib']} GiB usable ({RESERVED_GIB:g} GiB kept for CUDA context, NCCL, fragmentation): "
        + ("yes" if result["fits"] else "NO"),
    ]
    lines += [f"  {line}" for line in result.get("auto", [])]
    if w["cpu_offload"]:
        lines.append(f"  host memory for offloaded state: {result['host_gib_per_node']} GiB per node (pinned)")
    if not result["fits"]:
        fit = result["fitting_settings"]
        flag = lambda k, v: f"--{k}={str(v).lower() if isinstance(v, bool) else v}"  # noqa: E731
        lines.append(
            "settings that fit:"
            + (
                "".join(
                    f"\n  {' '.join(flag(k, v) for k, v in s.items() if k.startswith('train.'))}   "
                    f"(peak {s['peak_gib']} GiB, {s['hours']} h)"
                    for s in fit
                )
                if fit
                else " none on this many GPUs"
            )
        )
    lines.append(f"fewest GPUs as configured: {result['min_gpus_as_configured'] or 'more than 256'}")
    lines.append(
        f"time    {t['hours']:.1f} h for {t['epochs']} epochs, {t['tokens'] / 1e6:.1f}M tokens ({t['trained_tokens'] / 1e6:.1f}M "
        f"trained), {t['flops']:.3g} FLOPs (+{t['recompute_flops']:.3g} recomputed) at MFU {t['mfu']:.0%} ({t['mfu_source']})"
    )
    if "offload_hours" in t:
        lines.append(
            f"        of which {t['offload_hours']:.1f} h moving offloaded state and stepping AdamW on the host "
            f"(assumed {PCIE_BYTES_PER_S / 1e9:g} GB/s copies, {HOST_ADAM_BYTES_PER_S / 1e9:g} GB/s host AdamW)"
        )
    return "\n".join(lines)
