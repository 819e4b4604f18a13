"""`python -m c2a.plan`: the resolved training config -> per-rank memory, whether it fits, the settings that
would, and the run's time.

    python -m c2a.plan --config configs/claude2-alpaca-13b.toml --gpus 8 [--gpu h100] [--gpu-memory 80]
        [--nodes 1] [--mfu 0.4] [--json] [--section.key=value ...]

Data lengths come from a prepared cache (data.path a directory, or out_dir/data_cache of a started run), a local
data file (tokenized here with the run's tokenizer) or the demo task; otherwise from --examples / --mean-tokens /
--trained-fraction, stated as assumptions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2a.config import LlamaConfig, TrainConfig
from c2a.plan.memory import MemoryPlan, Workload, block_params, plan_memory

log = logging.getLogger("c2a.plan")

GiB = 2**30
# Dense bf16 peaks (FLOP/s, no sparsity) and memory of the cards the planner knows: vendors' datasheets
# (H100 SXM 989 TFLOP/s 80 GB, H200 989 TFLOP/s 141 GB, A100 SXM 312 TFLOP/s 80 GB).
GPUS = {"h100": (989e12, 80.0), "h200": (989e12, 141.0), "a100": (312e12, 80.0)}
# What a GPU holds besides the tensors the planner counts: CUDA context and kernels (~0.5-1 GB), NCCL's
# buffers, the caching allocator's fragmentation. An assumption, not a measurement.
RESERVED_GIB = 4.0
# c2a's MFU measured on one H200 (benchmarks/RESULTS.md, GPU training table, 2026-12-04): 39.5-40.5% for a
# Llama-2-7B block stack of 8 layers, rows of 2048, bf16, FSDP2 in a group of one, no activation
# checkpointing. Multi-GPU runs and the full 32/40-layer models are not measured: --mfu for another value.
DEFAULT_MFU = 0.40
# Without a cache to read lengths from: Alpaca's 52,002 examples, and the mean tokens of an example (prompt
# + response) and the share trained (response + EOS) for Claude-2-length answers. Assumptions, printed as such.
DEFAULT_EXAMPLES, DEFAULT_MEAN_TOKENS, DEFAULT_TRAINED_FRACTION = 52002, 400, 0.6


@dataclass(frozen=True)
class DataShape:
    examples: int
    tokens: int  # every example's positions, summed
    trained_tokens: int
    max_tokens: int  # the longest example (padded micro-batches are padded to their longest)
    source: str  # where the numbers come from ("assumed ..." when not measured)


@dataclass(frozen=True)
class Machine:
    gpus: int
    nodes: int
    name: str
    memory_gib: float
    peak_flops: float
    mfu: float
    mfu_source: str


def resolve_model(cfg: TrainConfig) -> tuple[LlamaConfig, str]:
    """The model from the checkpoint's config.json / params.json, or the preset; a checkpoint path that does not
    exist but names a Llama-2 size (the recipes' SET-ME/Llama-2-13b-hf) gives that preset, said so."""
    path = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    if path is None:
        return LlamaConfig.from_name(cfg.model.preset), f"preset {cfg.model.preset}"
    from c2a.model.weights import config_from_hf, config_from_meta

    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()), path / "config.json"), str(path / "config.json")
    if (path / "params.json").is_file():
        return config_from_meta(json.loads((path / "params.json").read_text()), path / "params.json"), str(path / "params.json")
    size = re.search(r"(?i)llama-?2-(7|13|70)b", str(path))
    if size:
        name = f"llama2-{size.group(1)}b"
        return LlamaConfig.from_name(name), f"preset {name} (assumed from the name {path}, which is not a checkpoint here)"
    raise ValueError(f"model.checkpoint {path}: no config.json or params.json there; point it at an HF or Meta checkpoint directory, or leave it empty and set model.preset")


def resolve_data(cfg: TrainConfig, examples: int | None, mean_tokens: float | None, trained_fraction: float | None) -> DataShape:
    if examples is not None or mean_tokens is not None or trained_fraction is not None:
        return _assumed(examples, mean_tokens, trained_fraction, "given")
    for cache in (Path(cfg.data.path), Path(cfg.out_dir) / "data_cache"):
        manifest = cache / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            c = m["counts"]
            return DataShape(c["examples"], c["tokens"], c["trained_tokens"], int(m["lengths"]["max"]), f"measured: {manifest}")
    if cfg.data.path == "demo":
        from c2a.data import TokenizedDataset, Tokenizer
        from c2a.data.demo import DEMO_TOKENIZER, demo_split

        records, _ = demo_split(cfg.data.demo_train_size, cfg.data.demo_heldout_size)
        ds = TokenizedDataset.from_records(records, Tokenizer(DEMO_TOKENIZER), cfg.data.max_len, truncation=cfg.data.truncation)
        c = ds.manifest["counts"]
        return DataShape(c["examples"], c["tokens"], c["trained_tokens"], int(ds.manifest["lengths"]["max"]), "measured: the demo task")
    if Path(cfg.data.path).is_file():  # a local data file: tokenized here as the trainer would (not cached)
        from c2a.data import TokenizedDataset, Tokenizer, load_records
        from c2a.train.loop import resolve_tokenizer

        loaded = load_records(cfg.data.path, skip_bad_rows=cfg.data.skip_bad_rows, skip_hint="--data.skip_bad_rows=true")
        ds = TokenizedDataset.from_records(loaded.records, Tokenizer(resolve_tokenizer(cfg)), cfg.data.max_len,
                                           truncation=cfg.data.truncation, workers=cfg.data.workers or 1, template=cfg.data.template)  # fmt: skip
        c = ds.manifest["counts"]
        return DataShape(c["examples"], c["tokens"], c["trained_tokens"], int(ds.manifest["lengths"]["max"]), f"measured: {cfg.data.path}")
    return _assumed(None, None, None, "assumed (no local data file or prepared cache: run python -m c2a.data.prepare, or pass "
                    "--examples/--mean-tokens)")  # fmt: skip


def _assumed(examples: int | None, mean_tokens: float | None, trained_fraction: float | None, how: str) -> DataShape:
    n = examples or DEFAULT_EXAMPLES
    mean = mean_tokens or DEFAULT_MEAN_TOKENS
    frac = trained_fraction or DEFAULT_TRAINED_FRACTION
    return DataShape(n, round(n * mean), round(n * mean * frac), 0, f"{how}: {n:,} examples of {mean:g} tokens, {frac:.0%} trained")


def workload(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine, **changes: Any) -> Workload:
    t = cfg.train
    seq_len = cfg.data.max_len if cfg.data.packing or not data.max_tokens else min(cfg.data.max_len, data.max_tokens)
    # packed rows are nearly full (0.27% padding on Alpaca-like lengths, c2a/data/batching.py); padded rows
    # are counted at their worst, a micro-batch holding the longest example
    positions = 1.0 if cfg.data.packing else data.tokens / data.examples / seq_len
    ranks = machine.gpus
    base = dict(micro_batch=t.micro_batch, seq_len=seq_len, trained_fraction=min(1.0, data.trained_tokens / data.tokens * positions),
                packed=cfg.data.packing, ranks=ranks, replicas=t.replicas, compute_bytes=4 if t.dtype == "fp32" else 2,
                backend="triton", activation_checkpointing=t.activation_checkpointing, ac_every=t.ac_every,
                accumulation=accumulation(cfg, data, ranks, t.micro_batch), cpu_offload=t.cpu_offload)  # fmt: skip
    base.update(changes)
    if "micro_batch" in changes and "accumulation" not in changes:
        base["accumulation"] = accumulation(cfg, data, ranks, changes["micro_batch"])
    return Workload(model, **base)


def accumulation(cfg: TrainConfig, data: DataShape, ranks: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step on a rank, as c2a.train.loop.make_loader sizes a step."""
    rows = cfg.train.global_batch
    if cfg.data.packing:
        per_row = cfg.data.max_len / (data.tokens / data.examples)  # examples a packed row holds
        unit = micro_batch * ranks
        rows = max(1, round(cfg.train.global_batch / per_row / unit)) * unit
    return max(1, math.ceil(rows / (micro_batch * ranks)))


def usable_bytes(machine: Machine) -> float:
    return (machine.memory_gib - RESERVED_GIB) * GiB


def fits(plan: MemoryPlan, machine: Machine) -> bool:
    return plan.peak <= usable_bytes(machine)


def suggestions(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> list[dict[str, Any]]:
    """Settings that fit, fastest first: no offload before offload, less recompute before more, larger
    micro-batches first; and with plain FSDP, HSDP replicas (one per node) when they fit."""
    out = []
    t = cfg.train
    for offload in (False, True):
        for ac in ("none", "selective", "full"):
            for mb in sorted({t.micro_batch, *[m for m in (8, 4, 2, 1) if m < t.micro_batch]}, reverse=True):
                w = workload(cfg, model, data, machine, activation_checkpointing=ac, micro_batch=mb, cpu_offload=offload)
                p = plan_memory(w)
                if fits(p, machine):
                    changed = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch=mb, activation_checkpointing=ac, cpu_offload=offload))
                    out.append({"train.micro_batch": mb, "train.activation_checkpointing": ac, "train.cpu_offload": offload,
                                "peak_gib": round(p.peak / GiB, 1), "hours": round(run_time(changed, model, data, machine)["hours"], 1)})  # fmt: skip
                    break
    if machine.nodes > 1 and t.replicas == 1:
        w = workload(cfg, model, data, machine, replicas=machine.nodes)
        p = plan_memory(w)
        if fits(p, machine):
            out.append({"train.replicas": machine.nodes, "peak_gib": round(p.peak / GiB, 1), "hours": round(run_time(cfg, model, data, machine)["hours"], 1)})
    return out


def min_gpus(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> int | None:
    """The fewest GPUs (1, 2, 4, 8, then whole 8-GPU nodes) on which the config as it is fits."""
    for n in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256):
        m = dataclasses.replace(machine, gpus=n, nodes=max(1, n // 8))
        if fits(plan_memory(workload(cfg, model, data, m, replicas=1)), m):
            return n
    return None


def run_time(cfg: TrainConfig, model: LlamaConfig, data: DataShape, machine: Machine) -> dict[str, Any]:
    """Hours of the whole run: FLOPs of every position trained on (6 per weight per token, plus causal
    attention per document, as c2a.train.metrics counts them), plus activation checkpointing's recompute,
    / (MFU x peak x GPUs). With cpu_offload, plus the host<->GPU copies and the host's AdamW step, which the
    GPU waits for (see `offload_seconds`)."""
    from c2a.train.metrics import attention_flops, matmul_flops_per_token

    epochs = cfg.train.epochs
    mean = data.tokens / data.examples
    attention = attention_flops(model, round(data.examples * mean * mean))
    flops = epochs * (data.tokens * matmul_flops_per_token(model) + attention)
    # activation checkpointing runs the checkpointed blocks' forward again: a third more of their work (their
    # forward is 2 of the 6 FLOPs a weight and 1 of the attention's 3 passes), not counted in MFU's model FLOPs
    w = Workload(model, cfg.train.micro_batch, cfg.data.max_len, activation_checkpointing=cfg.train.activation_checkpointing,
                 ac_every=cfg.train.ac_every)  # fmt: skip
    checkpointed = sum(w.checkpointed(i) for i in range(model.n_layers)) / model.n_layers
    recompute = epochs * checkpointed * (data.tokens * 2 * model.n_layers * block_params(model) + attention / 3)
    seconds = (flops + recompute) / (machine.mfu * machine.peak_flops * machine.gpus)
    result = {"epochs": epochs, "tokens": epochs * data.tokens, "trained_tokens": epochs * data.trained_tokens, "flops": flops,
              "recompute_flops": recompute, "mfu": machine.mfu, "mfu_source": machine.mfu_source, "compute_hours": seconds / 3600}  # fmt: skip
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
    a parameter: 16 read, 12 written)."""
    shard = model.num_params / (machine.gpus // cfg.train.replicas)
    rows = data.tokens / cfg.data.max_len if cfg.data.packing else data.examples
    micro_batches = cfg.train.epochs * rows / (cfg.train.micro_batch * machine.gpus)
    steps = micro_batches / accumulation(cfg, data, machine.gpus, cfg.train.micro_batch)
    return micro_batches * 12 * shard / PCIE_BYTES_PER_S + steps * 28 * shard / HOST_ADAM_BYTES_PER_S


def plan(cfg: TrainConfig, machine: Machine, examples: int | None = None, mean_tokens: float | None = None,
         trained_fraction: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything the CLI prints, as a dict (its --json output)."""
    model, model_source = resolve_model(cfg)
    data = resolve_data(cfg, examples, mean_tokens, trained_fraction)
    w = workload(cfg, model, data, machine)
    p = plan_memory(w)
    variants, saved = {}, {}
    for ac in ("none", "selective", "full"):
        v = plan_memory(dataclasses.replace(w, activation_checkpointing=ac))
        variants[ac], saved[ac] = round(v.peak / GiB, 2), round(v.activations / GiB, 2)
    return {
        "model": {"source": model_source, "params": model.num_params, "dim": model.dim, "layers": model.n_layers, "vocab": model.vocab_size},
        "data": dataclasses.asdict(data),
        "machine": dataclasses.asdict(machine),
        "workload": {k: v for k, v in dataclasses.asdict(w).items() if k != "model"},
        "per_rank_bytes": p.as_dict(),
        "peak_gib_by_activation_checkpointing": variants,
        "activations_gib_by_activation_checkpointing": saved,
        "usable_gib": round(usable_bytes(machine) / GiB, 1),
        "fits": fits(p, machine),
        "host_gib_per_node": round(p.host * machine.gpus / machine.nodes / GiB, 1),
        "fitting_settings": suggestions(cfg, model, data, machine),
        "min_gpus_as_configured": min_gpus(cfg, model, data, machine),
        "time": run_time(cfg, model, data, machine),
    }


def table(result: dict[str, Any]) -> str:
    p, w, t = result["per_rank_bytes"], result["workload"], result["time"]
    mach = result["machine"]
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"model   {result['model']['source']}: {result['model']['params'] / 1e9:.2f}B parameters",
        f"data    {result['data']['source']}",
        f"run     {mach['gpus']} x {mach['name']} ({mach['memory_gib']:g} GB) on {mach['nodes']} node(s); micro-batch "
        f"{w['micro_batch']} x {w['seq_len']} tokens, accumulation {w['accumulation']}, activation checkpointing "
        f"{w['activation_checkpointing']}, cpu_offload {w['cpu_offload']}, shards {w['ranks'] // w['replicas']}",
        "",
        "per rank",
        f"  parameters (fp32 shard)       {g(p['params'])}" + ("  (host)" if w["cpu_offload"] else ""),
        f"  gradients (fp32 shard)        {g(p['grads'])}" + ("  (host)" if w["cpu_offload"] else ""),
        f"  optimizer (AdamW, fp32)       {g(p['optimizer'])}" + ("  (host)" if w["cpu_offload"] else ""),
        f"  FSDP gathered at the peak     {g(p['fsdp'])}",
        f"  activations (saved)           {g(p['activations'])}",
        f"  loss head transient           {g(p['loss_head'])}",
        f"  peak (device)                 {g(p['peak'])}   at {p['peak_phase']}",
        "  by activation checkpointing:  " + ", ".join(f"{k}: activations {result['activations_gib_by_activation_checkpointing'][k]:.1f}, "
                                                      f"peak {v:.1f} GiB" for k, v in result["peak_gib_by_activation_checkpointing"].items()),
        f"  fits in {result['usable_gib']} GiB usable ({RESERVED_GIB:g} GiB kept for CUDA context, NCCL, fragmentation): "
        + ("yes" if result["fits"] else "NO"),
    ]
    if w["cpu_offload"]:
        lines.append(f"  host memory for offloaded state: {result['host_gib_per_node']} GiB per node (pinned)")
    if not result["fits"]:
        fit = result["fitting_settings"]
        flag = lambda k, v: f"--{k}={str(v).lower() if isinstance(v, bool) else v}"  # noqa: E731
        lines.append("settings that fit:" + ("".join(f"\n  {' '.join(flag(k, v) for k, v in s.items() if k.startswith('train.'))}   "
                                                      f"(peak {s['peak_gib']} GiB, {s['hours']} h)" for s in fit) if fit else " none on this many GPUs"))  # fmt: skip
    lines.append(f"fewest GPUs as configured: {result['min_gpus_as_configured'] or 'more than 256'}")
    lines.append(f"time    {t['hours']:.1f} h for {t['epochs']} epochs, {t['tokens'] / 1e6:.1f}M tokens ({t['trained_tokens'] / 1e6:.1f}M "
                 f"trained), {t['flops']:.3g} FLOPs (+{t['recompute_flops']:.3g} recomputed) at MFU {t['mfu']:.0%} ({t['mfu_source']})")  # fmt: skip
    if "offload_hours" in t:
        lines.append(f"        of which {t['offload_hours']:.1f} h moving offloaded state and stepping AdamW on the host "
                     f"(assumed {PCIE_BYTES_PER_S / 1e9:g} GB/s copies, {HOST_ADAM_BYTES_PER_S / 1e9:g} GB/s host AdamW)")  # fmt: skip
    return "\n".join(lines)


def compare_benchmark(path: str | Path) -> dict[str, Any]:
    """The planner's peak for benchmarks/train_throughput.py's c2a side (one rank, packed rows) against the
    peak it measured: torch.cuda.max_memory_allocated on CUDA, RSS on CPU (not comparable: the runtime is in
    it). gpu_check.sh runs this after its train stage and writes DIR/plan_vs_measured.json beside the JSON."""
    bench = json.loads(Path(path).read_text())
    s, side = bench["setup"], bench["sides"]["c2a"]
    model = LlamaConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], vocab_size=s["vocab_size"],
                        max_seq_len=max(4096, s["seq_len"]))  # fmt: skip
    cuda = s["device"].startswith("cuda")
    accum = re.search(r"accumulation (\d+)", side["batching"])
    w = Workload(model, s["rows_per_micro"], s["seq_len"], trained_fraction=0.5, packed=True, ranks=1,
                 compute_bytes=2 if s["dtype"] == "bf16" else 4, backend=side.get("kernels", "triton" if cuda else "torch"),
                 cuda=cuda, accumulation=int(accum.group(1)) if accum else 1)  # fmt: skip
    p = plan_memory(w)
    predicted = (p.peak if cuda else p.peak_combined) / 2**20
    result = {"predicted_peak_mib": round(predicted, 1), "measured_peak_mib": side["peak_memory_mib"],
              "measured": "torch.cuda.max_memory_allocated" if cuda else "RSS (includes the runtime: not comparable)",
              "ratio": round(predicted / side["peak_memory_mib"], 3), "peak_phase": p.peak_phase, "per_rank_bytes": p.as_dict()}  # fmt: skip
    out = Path(path).with_name("plan_vs_measured.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("c2a.plan: predicted peak %.0f MiB, measured %.0f MiB (%s): ratio %.3f", predicted, side["peak_memory_mib"],
             result["measured"], result["ratio"])  # fmt: skip
    return result


USAGE = """usage: python -m c2a.plan --config FILE.toml --gpus N [--gpu h100|a100|h200] [--gpu-memory GB] [--nodes M]
       [--mfu F] [--examples N --mean-tokens M --trained-fraction F] [--json] [--section.key=value ...]"""


def main(argv: list[str]) -> int:
    from c2a.train.cli import parse_args
    from c2a.train.loop import TrainingError

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    own = {"gpus": None, "gpu": "h100", "gpu-memory": None, "nodes": "1", "mfu": None, "examples": None, "mean-tokens": None,
           "trained-fraction": None}  # fmt: skip
    rest, as_json, i = [], False, 0
    while i < len(argv):
        key, eq, value = argv[i][2:].partition("=")
        if argv[i] == "--json":
            as_json = True
        elif argv[i].startswith("--") and key in own:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            own[key] = value
        else:
            rest.append(argv[i])
        i += 1
    if own["gpus"] is None:
        raise SystemExit("--gpus N is required: the number of GPUs the run would use\n" + USAGE)
    gpu = own["gpu"].lower()
    if gpu not in GPUS:
        raise SystemExit(f"--gpu {own['gpu']}: known cards are {', '.join(GPUS)}")
    flops, memory = GPUS[gpu]
    mfu = float(own["mfu"]) if own["mfu"] else DEFAULT_MFU
    machine = Machine(int(own["gpus"]), int(own["nodes"]), gpu.upper(), float(own["gpu-memory"] or memory), flops, mfu,
                      "given" if own["mfu"] else "measured on one H200 for an 8-layer 7B-shaped model; multi-GPU not measured")  # fmt: skip
    try:
        cfg = parse_args(rest)
        result = plan(cfg, machine, int(own["examples"]) if own["examples"] else None,
                      float(own["mean-tokens"]) if own["mean-tokens"] else None,
                      float(own["trained-fraction"]) if own["trained-fraction"] else None)  # fmt: skip
    except (ValueError, KeyError, OSError, TrainingError) as e:  # a config, checkpoint or data file to fix: the message
        raise SystemExit(f"c2a.plan: {e.args[0] if isinstance(e, KeyError) else e}") from None
    print(json.dumps(result, indent=1) if as_json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
