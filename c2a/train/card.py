"""The model card: out_dir/final/README.md in the Hugging Face hub's format (this module owns the file).

YAML front matter as the hub reads it: `base_model` only where the base is a hub id (model.base_model, or the
checkpoint config.json's `_name_or_path` when that is one: a local path is invalid metadata there),
`datasets` (the hub dataset names trained on), `library_name`, `tags` and `license` (the base's, read from its
card or config.json, where given). Then the recipe as the claude2-alpaca card's table, the data and
template, the final training and validation loss, the hardware and the wall time. final/adapter/, where a
run writes one, gets its own card with `library_name: peft`. `python -m c2a.eval ... --update-card` adds or
replaces its "## Evaluation" section.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from c2a.config import TrainConfig

CARD_FILE = "README.md"
EVAL_HEADING = "## Evaluation"
# owner/name as the hub spells repo ids: letters, digits, '-', '_', '.'; one slash
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_id(name: str) -> str | None:
    """`name` when it reads as a hub repo id and is not a path on this machine; None otherwise."""
    return name if name and _HUB_ID.match(name) and not Path(name).exists() else None


def base_model(cfg: TrainConfig) -> str | None:
    """model.base_model; else the checkpoint config.json's _name_or_path when it is a hub id."""
    if cfg.model.base_model:
        return cfg.model.base_model
    config = Path(cfg.model.checkpoint) / "config.json" if cfg.model.checkpoint else None
    if config is not None and config.is_file():
        return hub_id(str(json.loads(config.read_text()).get("_name_or_path", "")))
    return None


def base_license(checkpoint: str) -> str | None:
    """The base checkpoint's license: its card's front matter `license:`, else its config.json's `license`."""
    if not checkpoint:
        return None
    card, config = Path(checkpoint) / CARD_FILE, Path(checkpoint) / "config.json"
    if card.is_file():
        front = _front_matter(card.read_text(encoding="utf-8"))
        found = re.search(r"^license:\s*['\"]?([^'\"\s#]+)", front, re.MULTILINE)
        if found:
            return found.group(1)
    if config.is_file():
        value = json.loads(config.read_text()).get("license")
        return str(value) if value else None
    return None


def _front_matter(text: str) -> str:
    if not text.startswith("---\n"):
        return ""
    end = text.find("\n---", 4)
    return text[4:end] if end > 0 else ""


def _sources(cfg: TrainConfig) -> list[str]:
    return [m.path for m in cfg.data.mix] or [cfg.data.path]


def _data_lines(cfg: TrainConfig) -> list[str]:
    """The card's data section: each source (with its weight and own template in a mix) and the template."""
    if not cfg.data.mix:
        return [f"- `{cfg.data.path}`"]
    return [
        f"- `{m.path}`, weight {m.weight:g} (passes per epoch)" + (f", template `{m.template}`" if m.template else "")
        for m in cfg.data.mix
    ]


def _yaml(meta: dict[str, Any]) -> str:
    """Front matter: strings double-quoted (a JSON string is a valid YAML double-quoted scalar), lists in block style."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---", ""])


def lora_rank(cfg: TrainConfig) -> int:
    """The run's LoRA rank (0: a full fine-tune)."""
    return cfg.lora.rank


def hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return f"{world_size} process{'es' if world_size > 1 else ''} on CPU ({os.cpu_count()} cores)"


def card_text(cfg: TrainConfig, summary: dict[str, Any], hw: str, library: str = "transformers") -> str:
    """The card of a finished run: `summary` is the trainer's (final_loss, val_loss, train_seconds, ...)."""
    rank = lora_rank(cfg)
    meta: dict[str, Any] = {}
    base = base_model(cfg)
    if base:
        meta["base_model"] = base
    datasets = [hub for hub in (hub_id(p) for p in _sources(cfg)) if hub]
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = library
    qlora = cfg.lora.quantize == "nf4"
    meta["tags"] = ["c2a", "llama", "sft"] + (["lora"] if rank else []) + (["qlora"] if qlora else [])
    license_ = base_license(cfg.model.checkpoint)
    if license_:
        meta["license"] = license_
    t = cfg.train
    columns = ["global batch", "learning rate", "epochs", "max length", "weight decay"] + (
        ["LoRA rank"] if rank else []
    )
    values = [f"{t.global_batch} sequences", f"{t.lr:g}", str(t.epochs), str(cfg.data.max_len), f"{t.weight_decay:g}"]
    values += [str(rank)] if rank else []
    name = Path(cfg.out_dir).resolve().name
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned {'from ' + (base or cfg.model.checkpoint) if cfg.model.checkpoint else 'from a random init'}"
        f" with c2a ({'QLoRA' if qlora else 'LoRA' if rank else 'full fine-tune'}, {summary['steps']} optimizer steps)."
        + (
            " The base's block linears were held in NF4 (blocksize 64, double quantization): "
            + (
                "this adapter was trained against them (quantization.json, beside it, records how); merge it into"
                " that dequantized base, not into the original weights."
                if library == "peft"
                else "this model is that dequantized base plus the adapter (adapter/quantization.json records the"
                " quantization)."
            )
            if qlora
            else ""
        ),
        "",
        "## Recipe",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---:|" * len(columns),
        "| " + " | ".join(values) + " |",
        "",
        f"AdamW (betas {t.beta1:g}, {t.beta2:g}), cosine decay to {t.min_lr_ratio:g} x lr with {t.warmup_ratio:g} "
        f"linear warmup, gradient clipping at {t.grad_clip:g}, seed {t.seed}, {'packed' if cfg.data.packing else 'padded'} rows.",
        "",
        "## Data",
        "",
        *_data_lines(cfg),
        f"- template: `{cfg.data.template}` (Alpaca-format records always use Stanford Alpaca's prompt)",
        "",
        "## Results",
        "",
        *_results(summary),
        "",
        "## Hardware and time",
        "",
        f"{hw}; {summary['train_seconds']:.0f} s in training steps over the whole run, "
        f"{summary['wall_seconds']:.0f} s wall in its last session.",
        "",
    ]
    return _yaml(meta) + "\n" + "\n".join(lines)


def _results(summary: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---:|"]
    if summary.get("final_loss") is not None:
        rows.append(f"| final training loss | {summary['final_loss']:.4f} |")
    if "val_loss" in summary:
        rows.append(f"| validation loss | {summary['val_loss']:.4f} |")
        rows.append(f"| validation perplexity | {summary['val_ppl']:.3f} |")
    if "best_val_loss" in summary:
        rows.append(f"| best validation loss (exported) | {summary['best_val_loss']:.4f} |")
    if summary.get("demo_after"):
        rows.append(f"| demo exact match | {100 * summary['demo_after']['accuracy']:.1f}% |")
    return rows


def write_cards(final: Path, cfg: TrainConfig, summary: dict[str, Any], hw: str) -> Path:
    """final/README.md, and final/adapter/README.md where the run exported an adapter."""
    (final / CARD_FILE).write_text(card_text(cfg, summary, hw), encoding="utf-8")
    if (final / "adapter").is_dir():
        (final / "adapter" / CARD_FILE).write_text(card_text(cfg, summary, hw, library="peft"), encoding="utf-8")
    return final / CARD_FILE


def update_card(model_dir: str | Path, table: str, command: str) -> Path:
    """Adds (or replaces) the card's evaluation section with `table`, as `command` produced it."""
    path = Path(model_dir) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else _yaml({"library_name": "transformers"})
    start = text.find(f"\n{EVAL_HEADING}\n")
    if start >= 0:
        end = text.find("\n## ", start + len(EVAL_HEADING) + 2)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    body = table.strip() if table.lstrip().startswith("|") else f"```\n{table.strip()}\n```"  # a table, or plain lines
    section = f"\n{EVAL_HEADING}\n\n`{command}`\n\n{body}\n"
    path.write_text(text.rstrip("\n") + "\n" + section, encoding="utf-8")
    return path
