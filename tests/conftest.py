"""Shared test setup: offline HF, Triton's interpreter on machines without CUDA, the real tokenizer path."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports transformers or triton: never reach a model hub, and run Triton kernels through
# the CPU interpreter where there is no GPU (Triton reads this when a kernel is decorated).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The interpreter runs tl.dot as numpy matmul; OpenBLAS's worker threads, spinning against torch's on 2
# busy cores, made one interpreted attention backward take 2-12 s instead of 0.7 s (set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
# Meta's Llama-2 tokenizer, beside the project on development machines only; never copied into it.
REAL_TOKENIZER = ROOT.parent / "shared" / "assets" / "llama2-tokenizer.model"


@pytest.fixture
def real_tokenizer_path() -> Path:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"Meta's tokenizer not found at {REAL_TOKENIZER}")
    return REAL_TOKENIZER


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
