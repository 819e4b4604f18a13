"""The CUDA-only branches of c2a/train and of the attention launcher, taken on CPU where their logic allows
(benchmarks/RESULTS.md lists every CUDA branch beside the test that covers it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from c2a.config import LlamaConfig, build_config, resolve_dtype
from c2a.model import Llama
from c2a.model.flops import peak_flops, peak_flops_of
from c2a.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)  # a device object only: nothing is allocated on it


def test_auto_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp32", CUDA) == torch.float32 and resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_optimizer_on_cuda_is_fused_adamw_and_steps_like_foreach():
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16)
    train = build_config({}, {"train.weight_decay": "0.1"})
    models = [Llama(cfg), Llama(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    # torch 2.13 runs fused AdamW on CPU tensors too, so the CUDA choice itself can run here
    fused, plain = build_optimizer(models[0], train, CUDA), build_optimizer(models[1], train, torch.device("cpu"))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # norm weights never decay
    ids = torch.randint(0, 64, (2, 9))
    for model, opt in ((models[0], fused), (models[1], plain)):
        for _ in range(3):
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_peak_flops_by_device_name():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12  # not the SXM part's peak
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("Tesla T4") is None  # unknown: no MFU rather than a wrong one


def test_flash_attention_refuses_cpu_tensors_without_the_interpreter():
    code = (
        "import torch; from c2a.kernels.attention import flash_attention; q = torch.zeros(1, 4, 2, 16)\n"
        "try:\n    flash_attention(q, q, q)\nexcept RuntimeError as e:\n    print(e)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert "cpu tensors need TRITON_INTERPRET=1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
