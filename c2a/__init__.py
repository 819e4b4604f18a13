"""c2a: a from-scratch Llama-2 fine-tuning engine (Triton kernels, FSDP2) for the claude2-alpaca recipe."""

__version__ = "0.1.0"
