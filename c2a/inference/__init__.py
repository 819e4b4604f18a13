"""Inference on a trained checkpoint: loading it with its tokenizer, prompt formats, answers, held-out loss,
the demo task's exact match, and (the `eval` extra) lm-evaluation-harness.

Used by the `python -m c2a.generate` and `python -m c2a.eval` shells and by the trainer's validation and demo
evaluation; it reads config, model and data, never train or plan.
"""

from c2a.inference.answers import answers, demo_exact_match, respond, strip_stop, write_alpaca_eval
from c2a.inference.heldout import heldout_loss, target_loss_sum
from c2a.inference.loading import load_model, load_model_and_tokenizer, load_tokenizer, resolve_device, tokenizer_path
from c2a.inference.prompts import PromptFormat, alpaca_format, prompt_format

__all__ = [
    "PromptFormat",
    "alpaca_format",
    "answers",
    "demo_exact_match",
    "heldout_loss",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prompt_format",
    "resolve_device",
    "respond",
    "strip_stop",
    "target_loss_sum",
    "tokenizer_path",
    "write_alpaca_eval",
]
