"""The tensor-descriptor (TMA) forward of c2a/kernels/attention.py against float64 references, under the
interpreter (which runs `tl.make_tensor_descriptor` loads and stores with TMA's zero fill past the shape, and
accepts `warp_specialize`; what the GPU compiler makes of them is benchmarks/attention.py --compile-only's).

C2A_ATTN_FWD selects the variant; every test counts the launches of the two forward kernels, so a silent
fallback to the pointer kernel fails. Outputs are poisoned with NaN before each launch, as in test_attention.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from c2a.kernels import attention
from c2a.kernels.attention import _document_index, attention_forward, attention_reference, flash_attention
from test_attention import CountingKernel, poison_outputs  # noqa: F401 - poison_outputs: an autouse fixture

FP32_TOL = dict(rtol=1e-4, atol=2e-5)
LSE_TOL = dict(rtol=1e-5, atol=1e-4)  # lse is log2 of a sum, a few units in size
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ("tma", "tma_ws")


@pytest.fixture(autouse=True)
def forward_launches(monkeypatch) -> dict[str, CountingKernel]:
    kernels = {name: CountingKernel(getattr(attention, name)) for name in ("_attn_fwd_kernel", "_attn_fwd_tma_kernel")}
    for name, counting in kernels.items():
        monkeypatch.setattr(attention, name, counting)
    return kernels


def launched(forward_launches) -> dict[str, int]:
    return {name: k.launches for name, k in forward_launches.items()}


def positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)


def random_qkv(B: int, T: int, H: int, K: int, Hd: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and an upstream gradient dO, float64."""
    shapes = ((B, T, H, Hd), (B, T, K, Hd), (B, T, K, Hd), (B, T, H, Hd))
    return tuple(torch.randn(s, dtype=torch.float64).to(DEVICE) for s in shapes)


def reference_lse(q, k, position_ids) -> torch.Tensor:
    """[B, H, T] float64: log2 of Σ over visible keys of exp(q·k / sqrt(Hd)), the kernels' base-2 lse."""
    B, T, H, Hd = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    doc = torch.zeros(B, T, dtype=torch.long) if position_ids is None else (position_ids == 0).long().cumsum(1).cpu()
    t = torch.arange(T)
    visible = (t[None, :, None] >= t[None, None, :]) & (doc[:, :, None] == doc[:, None, :])  # [B, Tq, Tk]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Hd)
    scores = scores.masked_fill(~visible[:, None].to(q.device), float("-inf"))
    return scores.logsumexp(-1) / math.log(2)


def assert_forward_matches(q, k, v, position_ids, dtype=torch.float32, tol=FP32_TOL):
    """The launcher's o and lse on copies of q, k, v in dtype against float64 references."""
    doc_start = None if position_ids is None else _document_index(position_ids)[0]
    o, lse = attention_forward(*(x.to(dtype) for x in (q, k, v)), doc_start)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o.double(), attention_reference(q, k, v, position_ids), **tol)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, position_ids), **LSE_TOL)


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch, forward_launches) -> str:
    """C2A_ATTN_FWD set to a TMA variant; after the test, only the TMA kernel may have run."""
    monkeypatch.setenv("C2A_ATTN_FWD", request.param)
    yield request.param
    counts = launched(forward_launches)
    assert counts["_attn_fwd_kernel"] == 0 and counts["_attn_fwd_tma_kernel"] > 0, counts


# GQA groups 1, 2 and 4, head dims 16 to 64, T = 1, odd, and not a multiple of the 32-row query tile
@pytest.mark.parametrize("B,T,H,K,Hd", [(1, 1, 4, 1, 16), (2, 37, 4, 2, 16), (2, 100, 4, 1, 32), (1, 77, 4, 4, 64),
                                        (1, 64, 8, 2, 32)])  # fmt: skip
def test_one_document_per_row(variant, B, T, H, K, Hd):
    q, k, v, _ = random_qkv(B, T, H, K, Hd)
    assert_forward_matches(q, k, v, None)


PACKED_ROWS = {
    "1-to-4-docs": [[1, 44], [13, 17, 15], [5, 1, 30, 9], [45]],
    "length-1-docs": [[1, 1, 1, 42], [40, 1, 3, 1]],
    "tile-straddling": [[16, 17, 12], [33, 12]],
}


@pytest.mark.parametrize("rows", sorted(PACKED_ROWS))
@pytest.mark.parametrize("H,K,Hd", [(4, 1, 16), (4, 2, 32), (4, 4, 64)])
def test_packed_documents(variant, rows, H, K, Hd):
    position_ids = torch.stack([positions(row) for row in PACKED_ROWS[rows]])
    q, k, v, _ = random_qkv(position_ids.shape[0], position_ids.shape[1], H, K, Hd)
    assert_forward_matches(q, k, v, position_ids)


def test_forward_and_backward_gradients(variant):
    """The backward is the pointer one, but it recomputes P from this forward's lse: dQ, dK, dV check it."""
    position_ids = torch.stack([positions([1, 20, 1, 28]), positions([50])])
    q, k, v, do = random_qkv(2, 50, 4, 2, 32)
    got_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = flash_attention(*got_leaves, position_ids)
    o.backward(do.float())
    want = attention_reference(*want_leaves, position_ids)
    want.backward(do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), (o, *(x.grad for x in got_leaves)), (want, *(x.grad for x in want_leaves))):
        torch.testing.assert_close(g.double(), w, **FP32_TOL, msg=lambda m: f"{name}: {m}")


def test_strided_views(variant):
    """Slices of one fused [B, T, H + 2K, Hd] projection and a transposed [B, H, T, Hd] tensor: any batch,
    token and head strides that are 16-byte multiples go through descriptors."""
    B, T, H, K, Hd = 2, 40, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * K, Hd, dtype=torch.float64, device=DEVICE)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
    fused = qkv.float()
    qf, kf = fused[:, :, :H], fused[:, :, H : H + K]
    vf = v.float().transpose(1, 2).contiguous().transpose(1, 2)  # [B, K, T, Hd] storage
    position_ids = torch.stack([positions([15, 25]), positions([40])])
    o, lse = attention_forward(qf, kf, vf, _document_index(position_ids)[0])
    torch.testing.assert_close(o.double(), attention_reference(q, k, v, position_ids), **FP32_TOL)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, position_ids), **LSE_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_plumbing(variant, dtype):
    """bf16/fp16 descriptors (2-byte elements: other alignment arithmetic than fp32) in and out."""
    position_ids = positions([30, 1, 33])[None]
    q, k, v, _ = (x.to(dtype).double() for x in random_qkv(1, 64, 4, 2, 32))
    assert_forward_matches(q, k, v, position_ids, dtype=dtype, tol=BF16_TOL)


@pytest.mark.parametrize("packed", [False, True])
def test_gpu_tile_sizes(variant, monkeypatch, packed):
    """The bf16 tiles chosen for Hopper (not the interpreter's small ones) on rows longer than two of them,
    the data kept fp32 under the interpreter."""
    with monkeypatch.context() as m:
        m.setattr(attention, "_interpreting", lambda: False)
        blocks = attention._fwd_tma_blocks(64, torch.bfloat16)
    assert blocks.block_m >= 64 and blocks.block_n >= 64, blocks
    monkeypatch.setattr(attention, "_fwd_tma_blocks", lambda head_dim, dtype: blocks)
    T = 300
    position_ids = torch.stack([positions([1, 140, 29, 130]), positions([300])]) if packed else None
    q, k, v, _ = random_qkv(2, T, 4, 2, 64)
    assert_forward_matches(q, k, v, position_ids)


# ------------------------------------------------------------------------------------------------ layouts


def misaligned_qkv(B: int, T: int, H: int, K: int, Hd: int) -> tuple[torch.Tensor, ...]:
    """fp32 q, k, v whose token stride is heads·Hd + 1 elements: not a 16-byte multiple."""
    def view(heads):
        return torch.randn(B, T, heads * Hd + 1, device=DEVICE)[..., : heads * Hd].view(B, T, heads, Hd)
    return view(H), view(K), view(K)


def test_layout_problems_are_named():
    q = torch.randn(2, 8, 4, 16, device=DEVICE)
    assert attention._tma_layout_problem({"q": q}, None) is None
    assert attention._tma_layout_problem({"q": q}, (9, 0)) is None
    assert "compute capability 9.0 or newer, this GPU has 8.0" in attention._tma_layout_problem({"q": q}, (8, 0))
    shifted = torch.randn(q.numel() + 1, device=DEVICE)[1:].view(q.shape)  # base 4 B past an aligned one
    assert "q's data pointer is not 16-byte aligned" in attention._tma_layout_problem({"q": shifted}, None)
    qm, _, _ = misaligned_qkv(2, 8, 4, 1, 16)
    assert attention._tma_layout_problem({"q": qm}, None) == "q's token stride is 260 B, not a multiple of 16 B"


def test_misaligned_layout_raises_when_tma_is_asked_for(monkeypatch, forward_launches):
    monkeypatch.setenv("C2A_ATTN_FWD", "tma")
    q, k, v = misaligned_qkv(1, 20, 4, 2, 16)
    with pytest.raises(ValueError, match=r"C2A_ATTN_FWD=tma cannot run here: q's token stride is 260 B"):
        flash_attention(q, k, v)
    assert launched(forward_launches) == {"_attn_fwd_kernel": 0, "_attn_fwd_tma_kernel": 0}


def test_misaligned_layout_falls_back_when_tma_is_only_the_default(monkeypatch, forward_launches):
    """With TMA as the module's default (C2A_ATTN_FWD unset), a layout descriptors cannot read takes the
    pointer kernel, and an aligned one the TMA kernel."""
    monkeypatch.delenv("C2A_ATTN_FWD", raising=False)
    monkeypatch.setattr(attention, "_DEFAULT_FORWARD", "tma")
    position_ids = positions([7, 13])[None]
    q, k, v = misaligned_qkv(1, 20, 4, 2, 16)
    o = flash_attention(q, k, v, position_ids)
    assert launched(forward_launches) == {"_attn_fwd_kernel": 1, "_attn_fwd_tma_kernel": 0}
    want = attention_reference(*(x.double() for x in (q, k, v)), position_ids)
    torch.testing.assert_close(o.double(), want, **FP32_TOL)
    flash_attention(*(x.contiguous() for x in (q, k, v)), position_ids)
    assert launched(forward_launches) == {"_attn_fwd_kernel": 1, "_attn_fwd_tma_kernel": 1}


def test_pointer_variant_and_unknown_names(monkeypatch, forward_launches):
    q = torch.randn(1, 8, 4, 16, device=DEVICE)
    monkeypatch.setenv("C2A_ATTN_FWD", "pointer")
    flash_attention(q, q, q)
    assert launched(forward_launches) == {"_attn_fwd_kernel": 1, "_attn_fwd_tma_kernel": 0}
    monkeypatch.setenv("C2A_ATTN_FWD", "tma-ws")
    with pytest.raises(ValueError, match=r"C2A_ATTN_FWD must be one of \('pointer', 'tma', 'tma_ws'\), got 'tma-ws'"):
        flash_attention(q, q, q)
