"""A checkpoint and its tokenizer, loaded for inference: c2a.generate, c2a.eval and lm-eval's model."""

from __future__ import annotations

from pathlib import Path

import torch

from c2a.config import resolve_dtype
from c2a.data.tokenizer import Tokenizer, find_tokenizer
from c2a.model import Llama, load_pretrained
from c2a.model.adapter import merge_adapter_tensors, read_adapter
from c2a.model.weights import CheckpointReader


def tokenizer_path(model_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer` if given, else the checkpoint's tokenizer.model, else its tokenizer.json."""
    path = Path(tokenizer) if tokenizer else find_tokenizer(model_dir) or Path(model_dir) / "tokenizer.model"
    if not path.is_file():
        hint = (
            ""
            if tokenizer
            else "; pass --tokenizer PATH (Llama-2's tokenizer.model for Llama-2 weights, or a tokenizer.json)"
        )
        raise FileNotFoundError(f"tokenizer not found: {path}{hint}")
    return path


def resolve_device(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype: CUDA if present, else CPU; "auto" is bf16 on CUDA and fp32 on CPU."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return resolved, resolve_dtype(dtype, resolved)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def load_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None) -> Tokenizer:
    """The checkpoint's tokenizer (or `tokenizer`), after the directory is validated (files, names, shapes)."""
    CheckpointReader(model_dir)
    return Tokenizer(tokenizer_path(model_dir, tokenizer))


def load_model(
    model_dir: str | Path,
    tok: Tokenizer,
    device: str | None = None,
    dtype: str = "auto",
    adapter: str | Path | None = None,
) -> Llama:
    """The checkpoint in eval mode on `device` (default: CUDA if present, else CPU); `dtype` "auto" is bf16 on
    CUDA and fp32 on CPU. `adapter`, a PEFT LoRA adapter directory, is checked against the checkpoint's config
    before its weights are read, then merged into them (W + s·B·A, summed in fp32)."""
    device, torch_dtype = resolve_device(device, dtype)
    lora = read_adapter(adapter, CheckpointReader(model_dir).config) if adapter else None
    model = load_pretrained(model_dir, dtype=torch_dtype, device=device).eval()
    if lora is not None:
        merge_adapter_tensors(model, *lora)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model in {model_dir} has vocab_size "
            f"{model.cfg.vocab_size}: they do not belong together"
        )
    return model


def load_model_and_tokenizer(
    model_dir: str | Path, tokenizer: str | Path | None = None, device: str | None = None, dtype: str = "auto"
) -> tuple[Llama, Tokenizer]:
    """`load_model` and `load_tokenizer` together."""
    tok = load_tokenizer(model_dir, tokenizer)
    return load_model(model_dir, tok, device, dtype), tok
