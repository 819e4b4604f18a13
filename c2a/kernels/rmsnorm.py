"""RMSNorm: y = x · rsqrt(mean(x²) + eps) · w  (Zhang & Sennrich 2019; Llama's pre-norm).

Also the fused residual form used inside a block: h = x + r; y = RMSNorm(h), returning both h and y.

Forward, per row of D features (r = rstd, n the normalised row):
    r = (Σ x² / D + eps)^(-1/2)        n = x · r        y = round(n) · w
where round() casts to x's dtype before the weight multiplies, exactly as Meta's reference does.

Backward, with g = dy · w the gradient reaching n:
    dn/dx_j = r·e_j − x·r³·x_j/D  ⇒  dx = r · (g − n · Σ(g · n)/D)
    dw = Σ_rows dy · round(n)
With the residual fused, the gradient of x and of r are both dx + dh, where dh is what flowed back into h.

Saved for the backward: x (or h), w and r (one fp32 per row, 4 bytes against 2·D); n is recomputed.
dtype policy: x and w in fp32, bf16 or fp16 (the same dtype); every sum in fp32; y, h and dx in x's dtype.
dw is reduced across rows through per-program fp32 partial sums ([programs, D]) and summed once in fp32,
never accumulated in bf16.

Torch reference first (the spec), then the Triton kernels, the launchers, the autograd.Functions and the
public functions `rms_norm` and `add_rms_norm`.
"""

from __future__ import annotations

import functools

import torch

from ._triton import tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Meta's RMSNorm: normalise in fp32, cast back to x's dtype, then scale by the weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (in their dtype), y = RMSNorm(h) -> (h, y); the same ops as the unfused block."""
    h = x + residual
    return h, rms_norm_reference(h, weight, eps)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels. Rows are the flattened leading dimensions; each row holds n_cols contiguous features, and
# rows are stride_*_row apart (not necessarily n_cols: the launchers accept row-strided views).


# fmt: off
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    rstd_ptr,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_h_row,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per row: x [rows, n_cols] (row stride stride_x_row, unit column stride) -> y, rstd [rows].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
        # h is rounded to the stream's dtype, as `x + residual` in that dtype would be, and normalised so
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h_row + cols, h, mask=mask)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    n = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # round(n), as the reference casts before w
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, (n * w).to(y_ptr.dtype.element_ty), mask=mask)
# fmt: on


# fmt: off
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dh_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_dy_row,
    stride_x_row,
    stride_dh_row,
    stride_dx_row,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DRESIDUAL: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program p walks rows [p·rows_per_program, (p+1)·rows_per_program) and writes dx for each, plus one
    # fp32 row of dw partial sums, dw_partial [programs, n_cols], reduced on the host side in fp32.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds make the loop's row int64 too
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / n_cols))
        if HAS_DRESIDUAL:
            dx += tl.load(dh_ptr + row * stride_dh_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launchers: validate, flatten to rows, allocate, launch.

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row is held by one program's registers: Llama-2's widest row (70B, D = 8192) is 16 values a thread
# per array at 16 warps. Past 32768 the backward's half-dozen row-sized arrays would spill heavily.
MAX_COLS = 32768


def _settings(n_cols: int) -> tuple[int, int]:
    """BLOCK_D and num_warps for a row of n_cols features.

    BLOCK_D is the row rounded up to a power of two (masked). Warps: about 16 fp32 elements a thread
    (BLOCK_D / 512 warps, 1..16) keeps a 4096-wide row at 8 warps: enough loads in flight to stream a row
    per program, without register spills. Chosen by reasoning, not swept. On an H200 (bf16, 16384 rows of
    4096) the forward streams at 3755 GB/s, 90% of a device-to-device copy (benchmarks/kernels.py;
    benchmarks/RESULTS.md).
    """
    block_d = triton.next_power_of_2(n_cols)
    return block_d, min(max(block_d // 512, 1), 16)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: 4 per SM on CUDA, capped by the rows. Each program streams its rows one
    after another; by Little's law an H100 needs ~3.35 TB/s x ~0.7 us = 2.3 MB in flight, ~18 KB per SM,
    and one 4096-wide bf16 row of x and of dy is 16 KB, so a few programs per SM suffice, while the fp32
    partial-dw buffer stays small (528 x 4096 x 4 B = 8.6 MB against 400 MB of x, dy, dx at 16k tokens).
    Reasoned: an H200 sweep of 2-16 programs per SM × 4-16 warps was too noisy to choose by, forward +
    backward moving 2x between runs (benchmarks/RESULTS.md). The interpreter runs programs one by one, so a
    few suffice there."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * _sm_count(device.index if device.index is not None else 0)))
    return max(1, min(n_rows, 4))


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., D] with D > 0, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"{op}: weight must be [D] = [{D}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if D > MAX_COLS:
        raise ValueError(f"{op}: D must be at most {MAX_COLS} (one row per program), got {D}")
    tensors = {"x": x, "weight": weight} if residual is None else {"x": x, "residual": residual, "weight": weight}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must match x ({tuple(x.shape)}, {x.dtype}), "
            f"got ({tuple(residual.shape)}, {residual.dtype})"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., D] as [rows, D] with unit feature stride and one row stride, what the kernels index.

    A view wherever the leading dimensions merge into one stride: contiguous tensors, and row-strided ones
    such as generation's last position h[:, -1:] of a batch ([B, 1, D] with row stride T·D). Copied only
    when the features are not unit-stride, or when the leading dimensions cannot merge (reshape copies then).
    """
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, h, rstd): y and h shaped like x and contiguous (h is x itself without a residual), rstd fp32
    [rows]. x and residual may be row-strided (see _rows)."""
    D = x.shape[-1]
    x2 = _rows(x)  # [rows, D]
    weight = weight.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is None:
        r2, h2 = x2, x2  # unused by the kernel when HAS_RESIDUAL is False
    else:
        r2, h2 = _rows(residual), torch.empty((n_rows, D), dtype=x.dtype, device=x.device)
    block_d, num_warps = _settings(D)
    if n_rows > 0:
        # fmt: off
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, r2, weight, y, h2, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), h2.stride(0),
            D, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=True,
        )
        # fmt: on
    return y.view(x.shape), (x if residual is None else h2.view(x.shape)), rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None = None,
    compute_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (dx, dw): dx like x (plus dh when the residual was fused), dw like weight (None if not asked)."""
    D = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    dh2 = _rows(dh) if dh is not None else dy2
    weight = weight.contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, D), dtype=x.dtype, device=x.device)
    programs = _bwd_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dw_partial = torch.empty((programs, D) if compute_dw else (1, 1), dtype=torch.float32, device=x.device)
    block_d, num_warps = _settings(D)
    if n_rows > 0:
        # fmt: off
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dh2, dx, dw_partial,
            dy2.stride(0), x2.stride(0), dh2.stride(0), dx.stride(0),
            n_rows, D, rows_per_program,
            HAS_DRESIDUAL=dh is not None, COMPUTE_DW=compute_dw, BLOCK_D=block_d, num_warps=num_warps,
            enable_fp_fusion=True,
        )
        # fmt: on
    dw = None
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    return dx.view(x.shape), dw


# ---------------------------------------------------------------------------------------------------------
# autograd


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, _, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        y, h, rstd = rms_norm_forward(x, weight, eps, residual=residual)
        ctx.save_for_backward(h, weight, rstd)
        return h, y

    @staticmethod
    def backward(ctx, dh: torch.Tensor, dy: torch.Tensor):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, h, weight, rstd, dh=dh, compute_dw=ctx.needs_input_grad[2])
        # h = x + residual: both receive the same gradient (as torch's own add does)
        return dx, dx, dw, None


# ---------------------------------------------------------------------------------------------------------
# public functions


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> y [..., D] in x's dtype, through the Triton kernels."""
    _check("rms_norm", x, weight)
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, y = RMSNorm(h) -> (h, y), both [..., D] in x's dtype, in one pass over the rows.

    Against the unfused add then norm, it saves one write and one read of the residual stream in the
    forward (4 row-sized transfers instead of 5) and two in the backward (4 instead of 6).
    """
    _check("add_rms_norm", x, weight, residual)
    return AddRMSNormFunction.apply(x, residual, weight, eps)
