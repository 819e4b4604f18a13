"""The Triton attention kernel (c2a/kernels/attention.py) against float64 references, under the interpreter.

Every test here runs with the kernels' output buffers (O, lse, delta, dQ, dK, dV) filled with NaN before
each launch (the autouse fixture), so an element a kernel forgets to write fails the comparison. Cases name
the backward path they take ("atomic" dQ, the default, or "deterministic"), and the comparison checks that
the backward really took it, by counting the launches of the two kernels that finish dQ.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import pytest
import torch

import c2a.kernels
from c2a.kernels import attention
from c2a.kernels.attention import _document_index, attention_reference, document_bounds, flash_attention

FP32_TOL = dict(rtol=1e-4, atol=2e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # bf16 outputs carry 8 significant bits: 2^-8 ≈ 4e-3 relative each
FP16_TOL = dict(rtol=3e-3, atol=3e-3)  # 11 significant bits
# CPU under the interpreter (conftest.py sets TRITON_INTERPRET=1 there); the real kernels where there is a GPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(attention, "_POISON_OUTPUTS", True)


class CountingKernel:
    """Stands in for a @triton.jit kernel in the module's globals, counting its launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def dq_launches(monkeypatch) -> dict[str, CountingKernel]:
    """Counts the launches of the two ways to finish dQ: the deterministic path's separate dQ pass, and the
    atomic path's cast of its fp32 accumulator."""
    names = ("_attn_bwd_dq_kernel", "_attn_bwd_dq_cast_kernel")
    kernels = {name: CountingKernel(getattr(attention, name)) for name in names}
    for name, counting in kernels.items():
        monkeypatch.setattr(attention, name, counting)
    return kernels


@contextmanager
def backward_path(path: str):
    """The backward's dQ: "atomic" (fp32 atomics in the dK/dV pass, the default) or "deterministic" (its
    own pass, taken when torch's deterministic mode is on)."""
    assert path in ("atomic", "deterministic"), path
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(path == "deterministic")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def positions(lengths: list[int]) -> torch.Tensor:
    """Position ids of documents of these lengths packed into one row."""
    return torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)


def random_qkv(B: int, T: int, H: int, K: int, Hd: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and an upstream gradient dO, float64."""
    q = torch.randn(B, T, H, Hd, dtype=torch.float64)
    k = torch.randn(B, T, K, Hd, dtype=torch.float64)
    v = torch.randn(B, T, K, Hd, dtype=torch.float64)
    do = torch.randn(B, T, H, Hd, dtype=torch.float64)
    return tuple(x.to(DEVICE) for x in (q, k, v, do))


def run(fn, q, k, v, do, position_ids, dtype):
    """(o, dq, dk, dv) of fn on copies of q, k, v cast to dtype."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, position_ids)
    o.backward(do.to(dtype))
    return (o, *(x.grad for x in leaves))


def assert_matches_reference(q, k, v, do, position_ids, dtype=torch.float32, tol=FP32_TOL, path="atomic"):
    counting = {name: k for name, k in attention.__dict__.items() if isinstance(k, CountingKernel)}
    before = {name: k.launches for name, k in counting.items()}
    with backward_path(path):
        got = run(flash_attention, q, k, v, do, position_ids, dtype)
    # the backward took the path asked for: exactly one of the two dQ finishes ran
    ran = {name: k.launches - before[name] for name, k in counting.items()}
    want_ran = {"_attn_bwd_dq_kernel": int(path == "deterministic"), "_attn_bwd_dq_cast_kernel": int(path == "atomic")}
    assert ran == want_ran, ran
    want = run(attention_reference, q, k, v, do, position_ids, torch.float64)
    # On a GPU, bf16/fp16 kernels round P and dS to the input dtype before their matmuls, as every flash
    # kernel does; there they are held to twice the error of torch's own attention in that dtype instead.
    gpu_half = DEVICE.type == "cuda" and dtype != torch.float32
    torch_own = run(attention_reference, q, k, v, do, position_ids, dtype) if gpu_half else got
    for name, g, w, t in zip(("o", "dq", "dk", "dv"), got, want, torch_own):
        assert g.dtype == dtype and g.shape == w.shape, (name, g.dtype, g.shape)
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if gpu_half:
            err, torch_err = ((x.double() - w).abs().max().item() for x in (g, t))
            assert err <= 2 * torch_err + tol["atol"], f"{name}: max error {err:.3g}, torch's {torch_err:.3g}"
        else:
            torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{name}: {m}")


def test_poison_fixture_is_active():
    assert torch.isnan(attention._empty((3,), torch.float32, DEVICE)).all()


def dense_masked_attention(q, k, v, position_ids):
    """softmax(q kᵀ/sqrt(Hd) + mask) v with the [T, T] mask built explicitly, from the spec alone."""
    B, T, H, Hd = q.shape
    group = H // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))  # [B, T, H, Hd]
    # document id = number of position-id zeros up to and including t
    doc = torch.zeros(B, T, dtype=torch.long) if position_ids is None else (position_ids == 0).long().cumsum(1).cpu()
    t = torch.arange(T)
    allowed = (t[None, :, None] >= t[None, None, :]) & (doc[:, :, None] == doc[:, None, :])  # [B, Tq, Tk]
    allowed = allowed.to(q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Hd)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("H,K", [(4, 1), (4, 2), (6, 6)])
def test_reference_equals_dense_masked_softmax(H, K):
    B, T, Hd = 2, 40, 8
    q, k, v, _ = random_qkv(B, T, H, K, Hd)
    pos = torch.stack([positions([1, 12, 20, 7]), torch.cat([torch.arange(3, 25).to(DEVICE), positions([18])])])
    for position_ids in (None, pos):
        want = dense_masked_attention(q, k, v, position_ids)
        torch.testing.assert_close(attention_reference(q, k, v, position_ids), want, rtol=1e-12, atol=1e-12)


def test_document_index_matches_document_bounds():
    rows = [
        positions([1, 5, 1, 30, 3]),
        positions([40]),
        torch.arange(7, 47).to(DEVICE),  # no zero: one document that starts at t = 0
        torch.cat([torch.arange(2, 11).to(DEVICE), positions([1, 1, 29])]),  # first document does not start at 0
        torch.tensor([0, 1, 5, 9, 0, 0, 3, 1] * 5).to(DEVICE),  # only the zeros matter
    ]
    position_ids = torch.stack(rows)
    doc_start, doc_end = _document_index(position_ids)
    assert doc_start.dtype == doc_end.dtype == torch.int32
    for b, spans in enumerate(document_bounds(position_ids)):
        for s, e in spans:
            assert (doc_start[b, s:e] == s).all() and (doc_end[b, s:e] == e).all(), (b, s, e)


# GQA groups 1, 2, 4 and 8, head dims 16 to 64, each backward path on several of them
@pytest.mark.parametrize(
    "B,T,H,K,Hd,path",
    [
        (1, 1, 4, 1, 16, "atomic"),
        (2, 37, 4, 2, 16, "deterministic"),
        (1, 128, 4, 4, 16, "atomic"),
        (2, 100, 4, 1, 32, "deterministic"),
        (1, 64, 8, 1, 32, "atomic"),
        (1, 77, 4, 4, 64, "deterministic"),
        (1, 128, 4, 2, 64, "atomic"),
    ],
)
def test_one_document_per_row_matches_float64(B, T, H, K, Hd, path):
    assert_matches_reference(*random_qkv(B, T, H, K, Hd), None, path=path)


PACKED_ROWS = {
    "one-doc": [[45]],
    "1-to-4-docs": [[1, 44], [13, 17, 15], [5, 1, 30, 9], [45]],
    "length-1-docs": [[1, 1, 1, 42], [40, 1, 3, 1]],
    "tile-straddling": [[16, 17, 12], [33, 12]],
}


# every row set through both backward paths and GQA groups 4, 2 and 1; group 8 on the two with most documents
PACKED_CASES = [
    (rows, *heads)
    for rows in sorted(PACKED_ROWS)
    for heads in [(4, 1, 16, "deterministic"), (4, 2, 32, "atomic"), (4, 4, 64, "deterministic")]
] + [("1-to-4-docs", 8, 1, 16, "atomic"), ("length-1-docs", 8, 1, 16, "atomic")]


@pytest.mark.parametrize("rows,H,K,Hd,path", PACKED_CASES)
def test_packed_documents_match_float64(rows, H, K, Hd, path):
    lengths = PACKED_ROWS[rows]
    position_ids = torch.stack([positions(row) for row in lengths])
    assert_matches_reference(*random_qkv(len(lengths), position_ids.shape[1], H, K, Hd), position_ids, path=path)


def test_packed_longer_rows_match_float64():
    lengths = [[50, 1, 37, 40], [100, 28], [1, 126, 1]]
    position_ids = torch.stack([positions(row) for row in lengths])
    assert_matches_reference(*random_qkv(3, 128, 4, 2, 32), position_ids)


@pytest.mark.parametrize("path", ["atomic", "deterministic"])
def test_trailing_padding_document_gets_zero_gradient(path):
    """c2a packs padding as its own trailing document with labels -100, so dO is 0 there: its tokens must
    give finite outputs, no gradient to anything, and leave the real documents' gradients exact."""
    B, T, H, K, Hd = 2, 48, 4, 2, 32
    position_ids = torch.stack([positions([20, 9, 19]), positions([45, 3])])  # last doc of each row = padding
    q, k, v, do = random_qkv(B, T, H, K, Hd)
    do[0, 29:] = 0
    do[1, 45:] = 0
    with backward_path(path):
        got = run(flash_attention, q, k, v, do, position_ids, torch.float32)
    assert all(torch.isfinite(x).all() for x in got)
    for grad in got[1:]:
        assert (grad[0, 29:] == 0).all() and (grad[1, 45:] == 0).all()
    assert_matches_reference(q, k, v, do, position_ids, path=path)


def test_deterministic_backward_is_bitwise_reproducible():
    """With torch's deterministic mode on, two backward passes give bitwise-equal gradients (no atomics:
    the separate dQ pass runs, which assert_matches_reference checks). Under the interpreter the atomic path
    would pass this too, as its programs run one at a time; on a GPU the atomics' order varies."""
    position_ids = positions([1, 20, 19])[None]
    q, k, v, do = random_qkv(1, 40, 4, 2, 16)
    with backward_path("deterministic"):
        first, second = (run(flash_attention, q, k, v, do, position_ids, torch.float32) for _ in range(2))
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


def test_strided_views_are_read_in_place():
    """q, k, v as the model can produce them: slices of one fused [B, T, H + 2K, Hd] projection, a
    [B, H, T, Hd] tensor transposed, and a tensor whose head dim is not contiguous."""
    B, T, H, K, Hd = 2, 50, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * K, Hd, dtype=torch.float64, device=DEVICE)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
    do = torch.randn(B, H, T, Hd, dtype=torch.float64, device=DEVICE).transpose(1, 2)
    position_ids = torch.stack([positions([20, 30]), positions([50])])
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]  # fp32 copies; odd layouts rebuilt below
    fused = torch.cat(leaves, dim=2)
    qf, kf, vf = fused[:, :, :H], fused[:, :, H : H + K], fused[:, :, H + K :]
    vf = vf.transpose(-1, -2).contiguous().transpose(-1, -2)  # head-dim stride K, not 1
    assert qf.stride(1) == (H + 2 * K) * Hd and vf.stride(-1) != 1
    o = flash_attention(qf, kf, vf, position_ids)
    o.backward(do.float())
    want = run(attention_reference, q, k, v, do, position_ids, torch.float64)
    for name, g, w in zip(("o", "dq", "dk", "dv"), (o, *(x.grad for x in leaves)), want):
        torch.testing.assert_close(g.double(), w, **FP32_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("Hd", [64, 128])
def test_gpu_tile_sizes(monkeypatch, Hd):
    """The bf16 tiles chosen for the GPU (128 × 64 and friends, not the interpreter's small ones) on rows
    longer than two of them, packed and not. Under the interpreter the data stays fp32."""
    dtype, tol = torch.float32, FP32_TOL
    if DEVICE.type == "cuda":
        dtype, tol = torch.bfloat16, BF16_TOL  # the GPU picks these tiles for bf16 by itself
    else:
        with monkeypatch.context() as m:
            m.setattr(attention, "_interpreting", lambda: False)
            names = ("_fwd_blocks", "_bwd_dkdv_blocks", "_bwd_dq_blocks")
            gpu = {name: getattr(attention, name)(Hd, torch.bfloat16) for name in names}
        for name, blocks in gpu.items():
            assert blocks.block_m >= 32 and blocks.block_n >= 32, (name, blocks)
            monkeypatch.setattr(attention, name, lambda head_dim, dtype, blocks=blocks: blocks)
    T = 300
    position_ids = torch.stack([positions([1, 140, 29, 130]), positions([300])])
    q, k, v, do = random_qkv(2, T, 4, 2, Hd)
    if dtype != torch.float32:  # the reference sees the same rounded inputs
        q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))
    # both backward paths (the deterministic one is where the dQ pass's tiles run), one layout each
    assert_matches_reference(q, k, v, do, position_ids, dtype=dtype, tol=tol, path="atomic")
    assert_matches_reference(q[:1], k[:1], v[:1], do[:1], None, dtype=dtype, tol=tol, path="deterministic")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_plumbing(dtype):
    """bf16/fp16 in and out. The interpreter computes their dots in fp32, so this checks loads, stores and
    dtypes, with a tolerance for the inputs' and outputs' rounding (8 and 11 significant bits)."""
    position_ids = torch.stack([positions([30, 1, 33])])
    q, k, v, do = random_qkv(1, 64, 4, 2, 32)
    tol = BF16_TOL if dtype == torch.bfloat16 else FP16_TOL
    # the reference sees the same rounded inputs, so only the kernel's own rounding is measured
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))
    assert_matches_reference(q, k, v, do, position_ids, dtype=dtype, tol=tol)


def test_switch_dispatches_to_the_kernel(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(args[3])
        return flash_attention(*args)

    monkeypatch.setattr(attention, "flash_attention", counting)
    monkeypatch.setenv("C2A_KERNELS", "triton")
    q, k, v, _ = random_qkv(1, 20, 4, 2, 16)
    pos = positions([9, 11])[None]
    out = c2a.kernels.causal_attention(q.float(), k.float(), v.float(), pos)
    assert len(calls) == 1 and calls[0] is pos
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, pos), **FP32_TOL)


def test_validation_errors():
    q = torch.randn(1, 8, 4, 16, device=DEVICE)
    k = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"q must be \[B, T, heads, Hd\]"):
        flash_attention(q[0], k, k)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attention(q, k, k[:, :, :1])
    with pytest.raises(ValueError, match=r"k/v must be \[B=1, T=8, K, Hd=16\]"):
        flash_attention(q, k[:, :5], k[:, :5])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        flash_attention(q, k.new_zeros(1, 8, 3, 16), k.new_zeros(1, 8, 3, 16))
    with pytest.raises(ValueError, match=r"head dim must be one of \(16, 32, 64, 128\), got 24"):
        flash_attention(q.new_zeros(1, 8, 4, 24), k.new_zeros(1, 8, 2, 24), k.new_zeros(1, 8, 2, 24))
    with pytest.raises(ValueError, match=r"batch × query heads = 16384 × 4 exceeds CUDA's grid y-limit 65535"):
        flash_attention(q.new_zeros(16384, 0, 4, 16), k.new_zeros(16384, 0, 2, 16), k.new_zeros(16384, 0, 2, 16))
    with pytest.raises(TypeError, match="must share a dtype"):
        flash_attention(q, k.half(), k.half())
    with pytest.raises(TypeError, match="dtype must be one of"):
        flash_attention(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match=r"position_ids must be \[B=1, T=8\]"):
        flash_attention(q, k, k, positions([7])[None])
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        flash_attention(q, k, k, positions([8])[None].float())


def test_train_deterministic_selects_the_deterministic_backward(monkeypatch, dq_launches):
    """train.deterministic, applied by init_distributed before CUDA starts, turns on torch's deterministic
    mode (and cuBLAS's fixed workspace), which routes the attention backward to its separate dQ pass."""
    from c2a.config import TrainSection
    from c2a.train.parallel import use_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        use_deterministic(TrainSection().deterministic)  # off by default: nothing changes
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        use_deterministic(TrainSection(deterministic=True).deterministic)
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        q, k, v, do = random_qkv(1, 20, 4, 2, 16)
        run(flash_attention, q, k, v, do, None, torch.float32)
    finally:
        torch.use_deterministic_algorithms(was)
    assert dq_launches["_attn_bwd_dq_kernel"].launches == 1 and dq_launches["_attn_bwd_dq_cast_kernel"].launches == 0
