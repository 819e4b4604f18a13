"""`from c2a.model.generate import generate`: the public name of c2a.model.decode's generation."""

from c2a.model.decode import decode_one_token, generate, generate_batch, prefill, sample

__all__ = ["decode_one_token", "generate", "generate_batch", "prefill", "sample"]
