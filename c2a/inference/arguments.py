"""The command-line flags that c2a.generate and c2a.eval share: how a checkpoint is read, prompted and run."""

from __future__ import annotations

import argparse

from c2a.data import chat


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags c2a.generate and c2a.eval share: how the checkpoint is read and prompted, and where it runs."""
    ap.add_argument(
        "--template",
        default="alpaca",
        choices=chat.TEMPLATE_CHOICES,
        help="prompt format: alpaca (default), auto (the checkpoint's chat template, else alpaca), tokenizer "
        "(the checkpoint's chat template) or llama2-chat",
    )
    ap.add_argument(
        "--tokenizer",
        help="SentencePiece tokenizer.model or HF tokenizer.json (default: DIR/tokenizer.model, else DIR/tokenizer.json)",
    )
    ap.add_argument(
        "--adapter",
        help="a PEFT LoRA adapter directory made for DIR (c2a's final/adapter or any PEFT Llama adapter), merged at load",
    )
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
