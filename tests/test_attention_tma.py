"""The tensor-descriptor (TMA) forward, c2a/kernels/attention_tma.py, against float64 references, under the
interpreter (which runs `tl.make_tensor_descriptor` loads and stores with TMA's zero fill past the shape, and
accepts `warp_specialize`; what the GPU compiler makes of them is benchmarks/attention.py --compile-only's).

Every test counts the launches of the two forward kernels, so a silent fallback to the pointer kernel fails;
C2A_ATTN_FWD's choice between them is tested through c2a.kernels.causal_attention, which makes it. Outputs
are poisoned with NaN before each launch, as in test_attention.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_attention import CountingKernel, poison_outputs  # noqa: F401 - poison_outputs: an autouse fixture

import c2a.kernels
from c2a.kernels import attention, attention_tma
from c2a.kernels.attention import _document_index, attention_reference
from c2a.kernels.attention_tma import attention_forward_tma, flash_attention_tma

FP32_TOL = dict(rtol=1e-4, atol=2e-5)
LSE_TOL = dict(rtol=1e-5, atol=1e-4)  # lse is log2 of a sum, a few units in size
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def forward_launches(monkeypatch) -> dict[str, CountingKernel]:
    kernels = {}
    for module, name in ((attention, "_attn_fwd_kernel"), (attention_tma, "_attn_fwd_tma_kernel")):
        kernels[name] = CountingKernel(getattr(module, name))
        monkeypatch.setattr(module, name, kernels[name])
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


def assert_forward_matches(q, k, v, position_ids, warp_specialize, dtype=torch.float32, tol=FP32_TOL):
    """The launcher's o and lse on copies of q, k, v in dtype against float64 references."""
    doc_start = None if position_ids is None else _document_index(position_ids)[0]
    o, lse = attention_forward_tma(*(x.to(dtype) for x in (q, k, v)), doc_start, warp_specialize)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o.double(), attention_reference(q, k, v, position_ids), **tol)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, position_ids), **LSE_TOL)


@pytest.fixture(params=[False, True], ids=["tma", "tma_ws"])
def warp_specialize(request, forward_launches) -> bool:
    """The TMA forward's warp_specialize (C2A_ATTN_FWD=tma or tma_ws); after the test, only the TMA kernel
    may have run."""
    yield request.param
    counts = launched(forward_launches)
    assert counts["_attn_fwd_kernel"] == 0 and counts["_attn_fwd_tma_kernel"] > 0, counts


# GQA groups 1, 2 and 4, head dims 16 to 64, T = 1, odd, and not a multiple of the 32-row query tile
@pytest.mark.parametrize(
    "B,T,H,K,Hd", [(1, 1, 4, 1, 16), (2, 37, 4, 2, 16), (2, 100, 4, 1, 32), (1, 77, 4, 4, 64), (1, 64, 8, 2, 32)]
)
def test_one_document_per_row(warp_specialize, B, T, H, K, Hd):
    q, k, v, _ = random_qkv(B, T, H, K, Hd)
    assert_forward_matches(q, k, v, None, warp_specialize)


PACKED_ROWS = {
    "1-to-4-docs": [[1, 44], [13, 17, 15], [5, 1, 30, 9], [45]],
    "length-1-docs": [[1, 1, 1, 42], [40, 1, 3, 1]],
    "tile-straddling": [[16, 17, 12], [33, 12]],
}


@pytest.mark.parametrize("rows", sorted(PACKED_ROWS))
@pytest.mark.parametrize("H,K,Hd", [(4, 1, 16), (4, 2, 32), (4, 4, 64)])
def test_packed_documents(warp_specialize, rows, H, K, Hd):
    position_ids = torch.stack([positions(row) for row in PACKED_ROWS[rows]])
    q, k, v, _ = random_qkv(position_ids.shape[0], position_ids.shape[1], H, K, Hd)
    assert_forward_matches(q, k, v, position_ids, warp_specialize)


def test_forward_and_backward_gradients(warp_specialize):
    """The backward is the pointer one, but it recomputes P from this forward's lse: dQ, dK, dV check it."""
    position_ids = torch.stack([positions([1, 20, 1, 28]), positions([50])])
    q, k, v, do = random_qkv(2, 50, 4, 2, 32)
    got_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = flash_attention_tma(*got_leaves, position_ids, warp_specialize)
    o.backward(do.float())
    want = attention_reference(*want_leaves, position_ids)
    want.backward(do)
    for name, g, w in zip(
        ("o", "dq", "dk", "dv"), (o, *(x.grad for x in got_leaves)), (want, *(x.grad for x in want_leaves))
    ):
        torch.testing.assert_close(g.double(), w, **FP32_TOL, msg=lambda m: f"{name}: {m}")


def test_strided_views(warp_specialize):
    """Slices of one fused [B, T, H + 2K, Hd] projection and a transposed [B, H, T, Hd] tensor: any batch,
    token and head strides that are 16-byte multiples go through descriptors."""
    B, T, H, K, Hd = 2, 40, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * K, Hd, dtype=torch.float64, device=DEVICE)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
    fused = qkv.float()
    qf, kf = fused[:, :, :H], fused[:, :, H : H + K]
    vf = v.float().transpose(1, 2).contiguous().transpose(1, 2)  # [B, K, T, Hd] storage
    position_ids = torch.stack([positions([15, 25]), positions([40])])
    o, lse = attention_forward_tma(qf, kf, vf, _document_index(position_ids)[0], warp_specialize)
    torch.testing.assert_close(o.double(), attention_reference(q, k, v, position_ids), **FP32_TOL)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, position_ids), **LSE_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_plumbing(warp_specialize, dtype):
    """bf16/fp16 descriptors (2-byte elements: other alignment arithmetic than fp32) in and out."""
    position_ids = positions([30, 1, 33])[None]
    q, k, v, _ = (x.to(dtype).double() for x in random_qkv(1, 64, 4, 2, 32))
    assert_forward_matches(q, k, v, position_ids, warp_specialize, dtype=dtype, tol=BF16_TOL)


@pytest.mark.parametrize("packed", [False, True])
def test_gpu_tile_sizes(warp_specialize, monkeypatch, packed):
    """The bf16 tiles chosen for Hopper (not the interpreter's small ones) on rows longer than two of them,
    the data kept fp32 under the interpreter."""
    with monkeypatch.context() as m:
        m.setattr(attention_tma, "_interpreting", lambda: False)
        blocks = attention_tma._fwd_tma_blocks(64, torch.bfloat16)
    assert blocks.block_m >= 64 and blocks.block_n >= 64, blocks
    monkeypatch.setattr(attention_tma, "_fwd_tma_blocks", lambda head_dim, dtype: blocks)
    T = 300
    position_ids = torch.stack([positions([1, 140, 29, 130]), positions([300])]) if packed else None
    q, k, v, _ = random_qkv(2, T, 4, 2, 64)
    assert_forward_matches(q, k, v, position_ids, warp_specialize)


# ------------------------------------------------------------------------------------------------ layouts


def misaligned_qkv(B: int, T: int, H: int, K: int, Hd: int) -> tuple[torch.Tensor, ...]:
    """fp32 q, k, v whose token stride is heads·Hd + 1 elements: not a 16-byte multiple."""

    def view(heads):
        return torch.randn(B, T, heads * Hd + 1, device=DEVICE)[..., : heads * Hd].view(B, T, heads, Hd)

    return view(H), view(K), view(K)


def test_layout_problems_are_named():
    q = torch.randn(2, 8, 4, 16, device=DEVICE)
    assert attention_tma._tma_layout_problem({"q": q}, None) is None
    assert attention_tma._tma_layout_problem({"q": q}, (9, 0)) is None
    assert "compute capability 9.0 or newer, this GPU has 8.0" in attention_tma._tma_layout_problem({"q": q}, (8, 0))
    shifted = torch.randn(q.numel() + 1, device=DEVICE)[1:].view(q.shape)  # base 4 B past an aligned one
    assert "q's data pointer is not 16-byte aligned" in attention_tma._tma_layout_problem({"q": shifted}, None)
    qm, _, _ = misaligned_qkv(2, 8, 4, 1, 16)
    assert attention_tma._tma_layout_problem({"q": qm}, None) == "q's token stride is 260 B, not a multiple of 16 B"


def test_misaligned_layout_raises(monkeypatch, forward_launches):
    """Asked for, the TMA forward refuses a layout descriptors cannot read, naming the problem; the pointer
    forward, which reads it, is not run in its place."""
    q, k, v = misaligned_qkv(1, 20, 4, 2, 16)
    with pytest.raises(ValueError, match=r"\(C2A_ATTN_FWD=tma_ws\) cannot run here: q's token stride is 260 B"):
        flash_attention_tma(q, k, v, warp_specialize=True)
    monkeypatch.setenv("C2A_KERNELS", "triton")
    monkeypatch.setenv("C2A_ATTN_FWD", "tma")
    with pytest.raises(ValueError, match=r"\(C2A_ATTN_FWD=tma\) cannot run here: q's token stride is 260 B"):
        c2a.kernels.causal_attention(q, k, v, positions([7, 13])[None])
    assert launched(forward_launches) == {"_attn_fwd_kernel": 0, "_attn_fwd_tma_kernel": 0}


@pytest.mark.parametrize(
    "asked, kernel",
    [
        (None, "_attn_fwd_kernel"),
        ("", "_attn_fwd_kernel"),
        ("pointer", "_attn_fwd_kernel"),
        ("tma", "_attn_fwd_tma_kernel"),
        ("tma_ws", "_attn_fwd_tma_kernel"),
    ],
)
def test_switch_runs_the_asked_for_forward(monkeypatch, forward_launches, asked, kernel):
    """C2A_ATTN_FWD through the model's entry point: unset (or empty) and "pointer" run the pointer forward,
    "tma" and "tma_ws" the descriptor one (warp_specialize for "tma_ws"); only that kernel launches, and the
    output is the reference's."""
    monkeypatch.setenv("C2A_KERNELS", "triton")
    if asked is None:
        monkeypatch.delenv("C2A_ATTN_FWD", raising=False)
    else:
        monkeypatch.setenv("C2A_ATTN_FWD", asked)
    specialised = []  # warp_specialize of each TMA launcher call

    def recording(q, k, v, doc_start, warp_specialize):
        specialised.append(warp_specialize)
        return attention_forward_tma(q, k, v, doc_start, warp_specialize)

    monkeypatch.setattr(attention_tma, "attention_forward_tma", recording)
    position_ids = positions([7, 13])[None]
    q, k, v, _ = random_qkv(1, 20, 4, 2, 16)
    o = c2a.kernels.causal_attention(q.float(), k.float(), v.float(), position_ids)
    other = ({"_attn_fwd_kernel", "_attn_fwd_tma_kernel"} - {kernel}).pop()
    assert launched(forward_launches) == {kernel: 1, other: 0}
    assert specialised == ([] if kernel == "_attn_fwd_kernel" else [asked == "tma_ws"])
    torch.testing.assert_close(o.double(), attention_reference(q, k, v, position_ids), **FP32_TOL)


def test_unknown_forward_name(monkeypatch, forward_launches):
    monkeypatch.setenv("C2A_KERNELS", "triton")
    monkeypatch.setenv("C2A_ATTN_FWD", "tma-ws")
    q = torch.randn(1, 8, 4, 16, device=DEVICE)
    with pytest.raises(
        ValueError, match=r"C2A_ATTN_FWD must be one of pointer, tma, tma_ws \(or unset\), got 'tma-ws'"
    ):
        c2a.kernels.causal_attention(q, q, q, None)
    assert launched(forward_launches) == {"_attn_fwd_kernel": 0, "_attn_fwd_tma_kernel": 0}
