"""Linear cross-entropy: loss = Σ_t CE(h_t · Wᵀ, y_t) / n over targets y_t ≠ ignore_index.

`normalizer` n defaults to the number of trained targets in this call; the trainer passes the global
count so that gradient accumulation and data-parallel ranks divide by the same number.

Optional per-row `weights` w_t (fp32 [N]) make it loss = Σ_t w_t · CE_t / n, with dlogits scaled by w_t / n:
with w_t = 1 / (trained targets of t's example) and n = the number of examples, the per-example mean that
train.loss_weighting = "example" asks for (c2a.train.weighting). Without weights every w_t is 1.

The Triton path never holds more than one chunk of logits. Per chunk of C tokens:
    logits = h_c · Wᵀ                      fp32 [C, V] (GEMM with fp32 accumulation and fp32 output)
    one kernel program per token:          online logsumexp over V, the target's logit, the row's loss,
                                           and in place of the logits the gradient
                                           dlogits = (softmax − onehot(y)) / n   (0 if ignored)
    dh_c  = dlogits · W                    written into dh [N, D]
    dW   += dlogitsᵀ · h_c                 accumulated across chunks in fp32 [V, D]
and the chunk is discarded. Both gradients are complete when the forward returns; the backward only scales
them by grad_output. dtype policy: h and W in fp32, bf16 or fp16 (the same); logits, logsumexp and the loss
in fp32; dlogits in h's dtype for the two gradient GEMMs (each accumulating in fp32); dh in h's dtype; dW in
fp32 across chunks and until the backward, which rounds it to W's dtype once with grad_output's scale applied
in the same pass (one [V, D] result, no second rounded copy). The normaliser may be a device tensor: it is
read by the kernel, never by the host, so there is no .item() and no host sync. A target outside [0, V) that
is not -100 makes the loss NaN (a kernel cannot raise; NaN cannot go unnoticed).

Ignored rows (prompt and padding targets, about half of Alpaca's positions) skip the kernel's two reads of
their logits and only write a zero dlogits row, but still go through the three GEMMs: cuBLAS takes its sizes
on the host, and how many rows are trained is a device value here, so no device-side compaction (sorting the
trained rows first, say) can shrink a GEMM without a host sync to learn the count. The torch path on CPU
drops them before the head (c2a.model.llama._trained_rows), where reading the labels costs no sync.
By arithmetic, at 7B (16k tokens, D 4096, V 32000, half the rows ignored, H100 at 3.35 TB/s): the skip cuts
the kernel's traffic from 5.2 to 3.1 GB a micro-batch (1.6 -> 0.9 ms), while the GEMMs' share of the
ignored half is 6.4 of 12.9 TFLOP (~9 ms). That share needs the count on the host; the data loader has
it there before the batch reaches the device, and the trainer passes it down (Llama.loss(num_trained=),
c2a.model.llama._first_trained_rows), so in training the rows reaching this op are the trained ones.

Torch reference (the spec, materialises the logits), torch's chunked path (the model's torch backend),
then the Triton kernel, the launcher, the autograd.Function and the public function
`linear_cross_entropy`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._triton import tl, triton

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _weighted_sum(loss_rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Σ_t w_t · CE_t of per-row losses (0 on ignored rows), in fp32 (fp64 for fp64 inputs)."""
    if loss_rows.dtype in (torch.float16, torch.bfloat16):
        loss_rows = loss_rows.float()
    return loss_rows.sum() if weights is None else (loss_rows * weights.to(loss_rows.dtype)).sum()


def _normalise(loss_sum: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | float | None) -> torch.Tensor:
    if normalizer is None:
        # clamp: an all-ignored batch gives 0 / 1 = 0, not NaN
        normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / normalizer


def linear_cross_entropy_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """h [N, D], weight [V, D], labels [N], weights [N] or None -> scalar fp32 (fp64 for fp64 inputs). Builds
    all [N, V] logits."""
    logits = (h @ weight.T).float() if h.dtype != torch.float64 else h @ weight.T  # [N, V]
    if weights is None:
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        loss_rows = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")  # [N]
        loss_sum = _weighted_sum(loss_rows, weights)
    return _normalise(loss_sum, labels, normalizer)


# Rows per chunk of the torch path: the chunk's fp32 logits take about this many bytes. torch's "auto"
# choice on CPU is 8-16 rows, which re-reads the head weight 130-160 times per micro-batch: at
# 2048 x 256 -> 32000 (forward + backward, 2 cores) 1.14 s, against 0.57 s with 512-row chunks (64 MiB).
CHUNK_LOGITS_BYTES = 64 * 2**20


def chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_LOGITS_BYTES // (4 * vocab)))


def linear_cross_entropy_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked linear cross-entropy in torch: the [N, V] logits never exist at once, only a chunk of
    `chunk_rows` rows. torch >= 2.13 has it built in (F.linear_cross_entropy); older releases get the same
    thing from a loop of checkpointed chunks, each recomputed in the backward.

    At 8192 tokens x 256 -> 32000 on the 2-core CPU the built-in one peaked at 578 MB RSS against
    3,353 MB for the reference (DESIGN.md). With `weights`, the per-row losses ([N], reduction "none") are
    weighted and summed.
    """
    rows = chunk_rows(h.shape[0], weight.shape[0])
    if weights is not None:
        return _normalise(_weighted_sum(_chunked_rows_loss(h, weight, labels, rows), weights), labels, normalizer)
    if hasattr(F, "linear_cross_entropy"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)
        loss_sum = F.linear_cross_entropy(
            h, weight, labels, reduction="sum", ignore_index=IGNORE_INDEX, options=options
        )
    else:
        loss_sum = sum(
            (
                checkpoint(_chunk_loss_sum, h[i : i + rows], weight, labels[i : i + rows], use_reentrant=False)
                for i in range(0, h.shape[0], rows)
            ),
            h[:0].sum(dtype=torch.float32),  # zero rows: a 0 that backward can go through, not the int 0
        )
    return _normalise(loss_sum.float(), labels, normalizer)


def _chunked_rows_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row cross-entropy [N] (0 on ignored rows), chunk by chunk."""
    if hasattr(F, "linear_cross_entropy"):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)
        return F.linear_cross_entropy(h, weight, labels, reduction="none", ignore_index=IGNORE_INDEX, options=options)
    return torch.cat(
        [
            checkpoint(_chunk_loss_rows, h[i : i + rows], weight, labels[i : i + rows], use_reentrant=False)
            for i in range(0, h.shape[0], rows)
        ]
    )


def _chunk_loss_rows(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = h @ weight.T  # [rows, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = h @ weight.T  # [rows, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------------------------------------------
# Triton kernel: the softmax part of one chunk. The GEMMs around it are cuBLAS's (torch.mm).


# fmt: off
@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    inv_n_ptr,
    weights_ptr,
    loss_ptr,
    stride_logits_row,
    stride_grad_row,
    stride_labels,
    n_vocab,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # logits [C, V] fp32, grad [C, V] in h's dtype (may alias logits when that is fp32), labels [C] int,
    # inv_n [1] fp32 (1 / normaliser, on the device), weights [C] fp32 (read only when HAS_WEIGHTS),
    # loss [C] fp32 (w · CE). One program per token row.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row * stride_labels).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row

    if label == ignore_index:
        # A prompt or padding row: loss 0 and, for the gradient GEMMs, a zero dlogits row. Its logits are
        # never read: of the three V-long passes over the row (two reads, one write) only the write remains.
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty), mask=cols < n_vocab)
    else:
        # Pass 1: online logsumexp (running max m, running Σ exp(x − m)) and the target's logit.
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        target = tl.zeros([], tl.float32)
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits_row + cols, mask=cols < n_vocab, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            target += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
        # lse = m + log s, kept in two parts: x − m is exact near the maximum, so (x − m) − log s (and
        # (m − target) + log s) round once at the small magnitude, as torch's log_softmax does
        log_s = tl.log(s)
        in_range = (label >= 0) & (label < n_vocab)
        row_loss = tl.where(in_range, (m - target) + log_s, float("nan"))
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + row)
            row_loss = row_loss * w
        tl.store(loss_ptr + row, row_loss)

        # Pass 2: dlogits = w · (softmax − onehot) / n.
        if COMPUTE_GRAD:
            scale = tl.load(inv_n_ptr)
            if HAS_WEIGHTS:
                scale = scale * w
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_vocab
                x = tl.load(logits_row + cols, mask=mask, other=0.0)
                g = tl.exp((x - m) - log_s) - tl.where(cols == label, 1.0, 0.0)
                tl.store(grad_row + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launcher

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_settings(n_vocab: int) -> tuple[int, int]:
    """BLOCK_V and num_warps of the chunk kernel.

    The kernel streams a row of V fp32 logits twice (the second pass mostly from L2) and writes it once.
    4096 logits over 8 warps is 16 a thread per step: Llama-2's V = 32000 takes 8 steps a pass. Chosen by
    reasoning, not swept. On an H200 (bf16, 16384 tokens × 4096 → 32000) the whole op, GEMMs included, ran
    its forward in 7.08 ms against torch's 8.87 ms with the full logits, forward + backward in 20.9 ms against
    27.3 (benchmarks/kernels.py; benchmarks/RESULTS.md).
    """
    return min(triton.next_power_of_2(n_vocab), 4096), 8


def _chunk_rows(n_rows: int, dim: int, n_vocab: int) -> int:
    """Tokens per chunk: as many as make the chunk's [C, V] logits about as large as h [N, D] itself, so
    peak memory stays proportional to the activations whatever the vocabulary; rounded down to a power of
    two and kept within [256, 8192] so that each chunk's GEMMs stay large enough to fill an H100 (16k
    tokens x 4096 -> 32000 gives 2048-token chunks: 8 chunks, 262 MB of fp32 logits each)."""
    rows = max(1, n_rows * dim // n_vocab)
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n_rows, max(256, min(rows, 8192))))


def _has_fp32_out_gemm(t: torch.Tensor) -> bool:
    """Whether torch has mm/addmm with bf16/fp16 operands and an fp32 output for t's device: cuBLAS does
    (torch.mm(a, b, torch.float32)); CPU has no such kernel. Tests force True to run the CUDA branches'
    logic on CPU with stand-in GEMMs."""
    return t.is_cuda


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a · b with fp32 accumulation and no rounding to a's dtype on the way out."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if _has_fp32_out_gemm(a):
        return torch.mm(a, b, torch.float32, out=out)  # cuBLAS, bf16/fp16 operands, fp32 output
    # CPU (the interpreter tests): no out_dtype there; upcasting first is the same arithmetic, since the
    # product of two bf16/fp16 numbers is exact in fp32.
    return torch.mm(a.float(), b.float(), out=out)


_ADDMM_OUT_DTYPE_OK = True  # cleared once if this torch's CUDA addmm rejects an fp32 accumulator


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a · b, accumulating in fp32 without a rounded intermediate."""
    global _ADDMM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _has_fp32_out_gemm(a):
        if _ADDMM_OUT_DTYPE_OK:
            try:
                torch.addmm(acc, a, b, torch.float32, out=acc)  # one GEMM, fp32 C read and written
                return
            except torch.OutOfMemoryError:
                raise  # a RuntimeError too, but says nothing about dtype support
            except RuntimeError as err:  # a host-side dtype check: nothing ran on the device
                _ADDMM_OUT_DTYPE_OK = False
                log.warning("addmm with an fp32 accumulator unsupported (%s); using mm + add (more memory)", err)
        acc.add_(torch.mm(a, b, torch.float32))
        return
    acc.addmm_(a.float(), b.float())


def _check(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, normalizer, weights=None) -> None:
    op = "linear_cross_entropy"
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: h must be [N, D] and weight [V, D], got {tuple(h.shape)} and {tuple(weight.shape)}")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"{op}: labels must be [N] = [{h.shape[0]}], got {tuple(labels.shape)}")
    if h.dtype not in _DTYPES or weight.dtype != h.dtype:
        raise TypeError(
            f"{op}: h and weight must share a dtype among float32, bfloat16, float16, got {h.dtype} and {weight.dtype}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != h.device:
            raise ValueError(f"{op}: {name} must be on h's device {h.device}, got {t.device}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"{op}: normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}"
            )
    elif normalizer is not None and not normalizer > 0:
        raise ValueError(f"{op}: normalizer must be positive, got {normalizer}")
    if weights is not None and (weights.shape != labels.shape or weights.device != h.device):
        raise ValueError(
            f"{op}: weights must be [N] = [{h.shape[0]}] on {h.device}, got {tuple(weights.shape)} on {weights.device}"
        )


def linear_cross_entropy_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None,
    need_dh: bool,
    need_dw: bool,
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (loss fp32 scalar, dh [N, D] in h's dtype or None, dW [V, D] fp32 or None), the gradients of the
    loss itself. dW stays in its fp32 accumulator: the backward rounds it to W's dtype once, scale fused."""
    N, D = h.shape
    V = weight.shape[0]
    device = h.device
    if normalizer is None:
        n = (labels != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)  # stays on the device: no sync
    elif isinstance(normalizer, torch.Tensor):
        n = normalizer.detach().reshape(1).to(device=device, dtype=torch.float32)
    else:
        n = torch.full((1,), float(normalizer), dtype=torch.float32, device=device)
    inv_n = (1.0 / n).reshape(1)
    compute_grad = need_dh or need_dw
    w32 = weights.detach().to(torch.float32).contiguous() if weights is not None else None

    C = chunk_size if chunk_size is not None else _chunk_rows(N, D, V)
    C = max(1, min(C, N))
    loss_rows = torch.empty(N, dtype=torch.float32, device=device)
    logits = torch.empty((C, V), dtype=torch.float32, device=device)
    # dlogits go to the GEMMs in h's dtype; for fp32 inputs they overwrite the logits in place
    grad = logits if h.dtype == torch.float32 or not compute_grad else torch.empty((C, V), dtype=h.dtype, device=device)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=device) if need_dw else None
    block_v, num_warps = _kernel_settings(V)

    for start in range(0, N, C):
        end = min(start + C, N)
        rows = end - start
        h_c = h[start:end]  # [rows, D]
        logits_c, grad_c = logits[:rows], grad[:rows]  # [rows, V]
        _mm_fp32(h_c, weight.T, out=logits_c)  # [rows, D] · [D, V]
        w_c = w32[start:end] if w32 is not None else inv_n  # without weights the kernel never reads it
        # fmt: off
        _cross_entropy_chunk_kernel[(rows,)](
            logits_c, grad_c, labels[start:end], inv_n, w_c, loss_rows[start:end],
            logits_c.stride(0), grad_c.stride(0), labels.stride(0),
            V, IGNORE_INDEX,
            COMPUTE_GRAD=compute_grad, HAS_WEIGHTS=weights is not None, BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=True,
        )
        # fmt: on
        if need_dh:
            torch.mm(grad_c, weight, out=dh[start:end])  # [rows, V] · [V, D]
        if need_dw:
            _addmm_fp32_(dw, grad_c.T, h_c)  # [V, rows] · [rows, D]

    loss = loss_rows.sum() / n.reshape(())
    return loss, dh, dw


# ---------------------------------------------------------------------------------------------------------
# autograd


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, normalizer, chunk_size, weights=None):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw32 = linear_cross_entropy_forward(
            h, weight, labels, normalizer, need_dh, need_dw, chunk_size, weights
        )
        # Intermediates, not inputs: saving them (rather than ctx attributes) frees them once backward ran
        ctx.save_for_backward(dh, dw32)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Scale by grad_output on the device (usually 1.0; comparing it on the host would be a sync), out of
        # place, so that a retained graph's second backward scales the stored gradients afresh.
        dh, dw32 = ctx.saved_tensors
        dh = dh * grad_output.to(dh.dtype) if dh is not None else None
        dw = None
        if dw32 is not None:
            # dW [V, D] is made once, in W's dtype, scaled and rounded in one pass over the fp32 accumulator.
            # Rounding in the forward, then scaling, would make two more [V, D] tensors: at 13B (V 32000,
            # D 5120, bf16) 655 MB fp32 + 328 MB + 328 MB, against 655 MB + 328 MB this way
            # (tests/test_kernels_cross_entropy.py counts them).
            dw = torch.empty(dw32.shape, dtype=ctx.weight_dtype, device=dw32.device)
            torch.mul(dw32, grad_output, out=dw)
        return dh, dw, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# public function


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    *,
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ w·CE(h·Wᵀ, labels) over labels ≠ -100, divided by `normalizer` (default: their count,
    at least 1) -> fp32 scalar, without materialising the [N, V] logits.

    h [N, D], weight [V, D], labels [N], weights [N] (None: all 1; no gradient flows to them).
    `chunk_size` overrides the tokens per chunk (tests use it to put chunk boundaries at odd places).
    """
    _check(h, weight, labels, normalizer, weights)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        # evaluation (no_grad, or frozen inputs): the loss alone. ctx.needs_input_grad would still say True
        # for a leaf that requires grad under no_grad, and the gradient GEMMs triple the head's work.
        return linear_cross_entropy_forward(h, weight, labels, normalizer, False, False, chunk_size, weights)[0]
    return LinearCrossEntropyFunction.apply(h, weight, labels, normalizer, chunk_size, weights)
