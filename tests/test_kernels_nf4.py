"""NF4 (c2a/kernels/nf4.py) against QLoRA's own implementation, bitsandbytes: codes, scales and dequantized
weights bit-equal, for the torch reference and the Triton kernel (under TRITON_INTERPRET=1 on CPU), on random
weights, shapes whose block count is not a multiple of 256 or whose size is not a multiple of 64, fp32 / bf16 /
fp16 inputs and the weights of a tiny model trained here; and the dequantization error within NF4's bound.

bitsandbytes is the `qlora` extra: these tests skip without it, and .ci/run's last step installs it and fails
on a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import DEVICE, count_launches

from c2a.config import LlamaConfig
from c2a.kernels import nf4 as nf4_module
from c2a.kernels.nf4 import (
    BLOCK,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_weight,
    dynamic_map,
    nf4_absmax_reference,
    nf4_table,
    quantize_nf4,
)
from c2a.model import Llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = Path(__file__).resolve().parents[1]
# 576 x 576: SmolLM2's projections, 5,184 blocks (not a multiple of 256); 96 x 200: 300 blocks; 7 x 13: 91
# weights (a short block and an odd count: bitsandbytes pads a nibble); 3 x 16453: 772 blocks, the last short
SHAPES = [(576, 576), (96, 200), (7, 13), (3, 16453)]


@pytest.fixture
def bnb():
    functional = pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes (pip install -e '.[bitsandbytes]')"
    )
    # bitsandbytes dequantizes odd last dims through torch.compile'd code: eager is the same arithmetic,
    # without a compile per shape (seconds each on 2 cores)
    with torch._dynamo.config.patch(disable=True):
        yield functional


def bnb_nf4(bnb, w: torch.Tensor):
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed.reshape(-1), state, bnb.dequantize_4bit(packed, state).reshape(w.shape)


def assert_bit_equal(bnb, w: torch.Tensor, name: str) -> None:
    packed, state, dequantized = bnb_nf4(bnb, w)
    q = quantize_nf4(w, name)
    assert torch.equal(q.codes.reshape(-1)[: packed.numel()], packed), f"{name}: codes differ"
    assert torch.equal(q.qabsmax, state.absmax), f"{name}: 8-bit absmaxes differ"
    assert torch.equal(q.absmax2, state.state2.absmax), f"{name}: second-level scales differ"
    assert torch.equal(q.offset, state.offset), f"{name}: offset differs"
    assert torch.equal(dequantize_nf4_weight(q), dequantized), f"{name}: torch dequantization differs"
    tq = [t.to(DEVICE) for t in (q.codes, q.qabsmax, q.absmax2, q.offset)]
    kernel = dequantize_nf4(*tq, q.shape, w.dtype).cpu()
    assert torch.equal(kernel, dequantized), f"{name}: Triton dequantization differs"


def test_tables_are_bitsandbytes(bnb):
    assert torch.equal(nf4_table(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_weights_bit_equal_to_bitsandbytes(bnb, shape, dtype):
    w = (0.02 * torch.randn(shape)).to(dtype)
    w.view(-1)[BLOCK : 2 * BLOCK] = 0  # an all-zero block (absmax 0) where there are two or more
    w.view(-1)[-1] = 0.5  # an outlier: the absmaxes' second-level scale spans a wide range
    assert_bit_equal(bnb, w, f"random {shape}")


def test_trained_model_weights_bit_equal_to_bitsandbytes(bnb):
    """Trained weights are not Gaussian (norms, a vocabulary's rows): every parameter of a small Llama after
    20 AdamW steps on a repeated sequence, in bf16 as a run would hold them."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32)
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    first = None
    for _ in range(20):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0, "the model did not train"
    for name, p in model.named_parameters():
        assert_bit_equal(bnb, p.detach().bfloat16(), name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantization_error_within_nf4_bound(dtype):
    """|w − ŵ| ≤ half the widest NF4 gap · absmax (the 4-bit rounding) + the absmax's own 8-bit error, at most
    half the widest dynamic-map gap · absmax2 plus the 65,536-step grid, + the output dtype's rounding."""
    w = (0.02 * torch.randn(333, 192)).to(dtype)
    q = quantize_nf4(w)
    approx = dequantize_nf4_weight(q, torch.float32)
    blocks = torch.nn.functional.pad(w.float().reshape(-1), (0, q.codes.shape[0] * BLOCK - w.numel()))
    absmax = blocks.view(-1, BLOCK).abs().amax(1)
    nf4_half_gap = nf4_table().diff().max() / 2
    dyn_half_gap = dynamic_map().diff().max() / 2 + 2 / 65535
    absmax_err = dyn_half_gap * q.absmax2.repeat_interleave(256)[: absmax.numel()]
    bound = nf4_half_gap * absmax + absmax_err
    err = (approx - w.float()).abs().reshape(-1)
    per_weight = bound.repeat_interleave(BLOCK)[: w.numel()] + torch.finfo(dtype).eps * approx.abs().reshape(-1)
    assert (err <= per_weight * (1 + 1e-6)).all(), f"max excess {(err - per_weight).max().item():.3g}"
    # and the absmaxes themselves within their 8-bit bound
    assert ((nf4_absmax_reference(q.qabsmax, q.absmax2, q.offset) - absmax).abs() <= absmax_err * (1 + 1e-6)).all()


def test_weight_size_not_a_multiple_of_64_pads_a_short_block():
    """bitsandbytes' padding: the last block holds the remaining 27 weights, its absmax over them alone; the
    missing codes are 0.0's (7)."""
    w = torch.randn(91)
    q = quantize_nf4(w)
    assert q.codes.shape == (2, 32)
    last = w[64:]
    assert nf4_absmax_reference(q.qabsmax, q.absmax2, q.offset)[1].item() == pytest.approx(
        last.abs().max().item(), rel=0.01
    )
    assert (q.codes.reshape(-1)[46:] & 0xF).eq(7).all() and (q.codes.reshape(-1)[46:] >> 4).eq(7).all()
    assert dequantize_nf4_weight(q).shape == (91,)


def test_short_block_divides_full_blocks_multiply_as_bitsandbytes(bnb):
    """bitsandbytes scales a full block by w · (1/absmax) and the short last block by w / absmax. For this pair
    (found by search) the two roundings fall on either side of the midpoint between NF4 codes 0 and 1."""
    a, x = 0.062466591596603394, -0.05297768861055374
    pair = torch.tensor([a, x])
    assert torch.bucketize(pair[1:] / a, (nf4_table()[:-1] + nf4_table()[1:]) / 2).item() == 0
    full_then_short = torch.cat([pair, torch.zeros(62), pair])  # the pair in a full block, then as the short one
    assert_bit_equal(bnb, full_then_short, "full and short blocks")
    q = quantize_nf4(full_then_short)
    assert (q.codes[0, 0] & 0xF, q.codes[1, 0] & 0xF) == (1, 0)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: torch.randint(0, 9, (64,)), TypeError, "quantize_nf4: layers.0.wq must be float32, bfloat16"),
        (lambda: torch.empty(0, 64), ValueError, r"quantize_nf4: layers.0.wq is empty \(shape \(0, 64\)\)"),
    ],
    ids=["int", "empty"],
)
def test_quantize_refuses_bad_tensors_naming_them(make, error, message):
    with pytest.raises(error, match=message):
        quantize_nf4(make(), "layers.0.wq")


def test_triton_dequantize_refuses_bad_inputs():
    q = quantize_nf4(torch.randn(8, 64))
    parts = (q.codes, q.qabsmax, q.absmax2, q.offset)
    with pytest.raises(ValueError, match=r"dequantize_nf4: codes must be uint8 \[blocks, 32\]"):
        dequantize_nf4(q.codes.view(-1), *parts[1:], q.shape, torch.float32)
    with pytest.raises(ValueError, match=r"dequantize_nf4: 8 blocks cannot hold shape \(9, 64\)"):
        dequantize_nf4(*parts, (9, 64), torch.float32)
    with pytest.raises(TypeError, match="dequantize_nf4: the output dtype must be"):
        dequantize_nf4(*parts, q.shape, torch.float64)


def test_triton_kernel_runs_once_and_matches_reference(monkeypatch):
    """One launch for a whole weight, the same bits as the torch reference (no bitsandbytes needed)."""
    launches = count_launches(monkeypatch, nf4_module, "_nf4_dequant_kernel")
    q: NF4Weight = quantize_nf4((0.02 * torch.randn(130, 70)).bfloat16())
    parts = [t.to(DEVICE) for t in (q.codes, q.qabsmax, q.absmax2, q.offset)]
    for dtype in DTYPES:
        out = dequantize_nf4(*parts, q.shape, dtype).cpu()
        assert torch.equal(out, dequantize_nf4_reference(q.codes, q.qabsmax, q.absmax2, q.offset, q.shape, dtype))
    assert launches.launches == len(DTYPES)


def test_triton_kernel_compiles_for_h100_and_a100_without_spills():
    """The interpreter accepts code Triton's compiler rejects: build the kernel for sm_90a and sm_80 with the
    real compiler (benchmarks/nf4.py --compile-only, in a process without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "nf4.py"), "--compile-only", "--arch", "90,80"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 6 and all(line.endswith(" 0 spill bytes") for line in lines), proc.stdout
