"""The run's export: out_dir/final/ as an HF directory (weights, config.json, the tokenizer's files, the chat
template the run trained with), streamed one gathered parameter at a time through rank 0."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from c2a.config import LlamaConfig
from c2a.data import chat
from c2a.data.tokenizer import CHAT_TEMPLATE_FILE, export_tokenizer
from c2a.model.adapter import AdapterSpec, save_adapter
from c2a.model.llama import Llama
from c2a.model.lora import lora_layers
from c2a.model.qlora import nf4_bases, write_quantization
from c2a.model.weights import save_hf
from c2a.train.lora_run import dequantized_stream, merged_stream
from c2a.train.parallel import Dist, full_parameters
from c2a.train.run_data import RunData

log = logging.getLogger("c2a")


def gather_model(model: Llama, model_cfg: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Llama | None:
    """Collective: an unsharded copy of the model on rank 0's `device` (None elsewhere)."""
    copy = None
    if dist.get_rank() == 0:
        with torch.device("meta"):
            copy = Llama(model_cfg)
        copy = copy.to(dtype).to_empty(device=device)
    params = dict(copy.named_parameters()) if copy is not None else {}
    with torch.no_grad():
        for name, full in plain_parameters(model, dtype, {}):
            if copy is not None:
                params[name].copy_(full)
    return copy


def plain_parameters(
    model: Llama, dtype: torch.dtype, adapter: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Collective: `full_parameters` as a plain Llama's, in `dtype`: with LoRA, each adapted weight merged
    (W + s·B·A) and the adapters themselves put into `adapter` (rank 0)."""
    layers = lora_layers(model)
    if not layers:
        return full_parameters(model, dtype)
    scale = next(iter(layers.values())).scale
    tensors, bases = full_parameters(model), nf4_bases(model)
    if bases:  # QLoRA: W is the dequantized NF4 base, in the compute dtype the run trained with
        tensors = dequantized_stream(tensors, bases, dtype)
    return merged_stream(tensors, set(layers), scale, dtype, adapter)


def trained_template(data: RunData, template: str) -> str | None:
    """The Jinja source of the prompt format the run trained with: the chat template its chat records were
    rendered with (a run mixing both kinds counts as chat), else Alpaca's (`chat.ALPACA_TEMPLATE`: Alpaca
    records only, the demo). None, with a warning, when a prepared cache's recorded template is not what
    data.template resolves to here (the cache records its sha256, not its text)."""
    recorded = data.train.manifest.get("chat_template")
    if recorded is None:  # Alpaca records: Alpaca's prompt, by the released model's rule if trained so
        return chat.ALPACA_RELEASED_TEMPLATE if template == chat.ALPACA_RELEASED else chat.ALPACA_TEMPLATE
    try:
        label, source = chat.resolve_template(template, data.tokenizer)
    except chat.ChatTemplateError as e:
        log.warning("final/ gets no %s: %s", CHAT_TEMPLATE_FILE, e)
        return None
    if chat.template_sha256(source) != recorded["sha256"]:
        log.warning(
            "final/ gets no %s: the data's chat records were rendered with %s, but data.template=%s is %s",
            CHAT_TEMPLATE_FILE,
            recorded["name"],
            template,
            label,
        )
        return None
    return source


def export_final(
    model: Llama,
    model_cfg: LlamaConfig,
    tokenizer_path: Path,
    out: Path,
    dtype: torch.dtype,
    d: Dist,
    chat_template: str | None = None,
    lora: AdapterSpec | None = None,
    base_model: str = "",
) -> Path:
    """Collective: out_dir/final/ as an HF directory (safetensors, config.json, the tokenizer's files), written
    beside it and renamed into place, streaming one parameter at a time through rank 0. `chat_template` (the
    one the run trained with, `trained_template`) goes into final/chat_template.jinja, where transformers'
    apply_chat_template and `python -m c2a.generate --template auto` find it before tokenizer_config.json's.
    With LoRA (`lora`), final/ holds the merged model and final/adapter/ the PEFT adapter made for `base_model`;
    with QLoRA, final/ merges into the dequantized NF4 base and final/adapter/quantization.json records the
    quantization the adapter was trained against."""
    final, tmp = out / "final", out / "final.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    adapter: dict[str, torch.Tensor] = {}
    tensors = plain_parameters(model, dtype, adapter)
    if d.is_main:
        save_hf(model_cfg, tensors, tmp)
        if lora is not None:
            save_adapter(lora, model_cfg, adapter.items(), tmp / "adapter", base_model)
            if nf4_bases(model):
                write_quantization(tmp / "adapter", dtype, lora.targets)
        export_tokenizer(tokenizer_path, tmp)  # tokenizer.model, or tokenizer.json with its config files
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    else:
        for _ in tensors:  # take part in every gather
            pass
    dist.barrier()
    return final
