"""NF4 weights in QLoRA's format (Dettmers et al. 2023, arXiv:2305.14314), bit for bit as bitsandbytes stores
them: `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`.

Format, for a weight of n elements read in row-major order:
    blocks of 64:   absmax_b = max |w| over block b;  code = nearest NF4 value to w / absmax_b (4 bits)
    packed codes:   two a byte, the earlier element in the high nibble; stored here block-major, [blocks, 32]
                    uint8, so a split along dim 0 (FSDP2's sharding) hands each rank whole blocks
    double quant:   offset = mean(absmax);  absmax − offset quantized again in blocks of 256 with bitsandbytes'
                    signed 8-bit dynamic map: qabsmax (uint8 [blocks]) and absmax2 (fp32 [ceil(blocks/256)])
Dequantization:
    absmax_b = DYN[qabsmax_b] · absmax2[b // 256] + offset          (fp32, a multiply then an add: no FMA)
    w_i      = NF4[code_i] · absmax_{i // 64}                        (fp32, rounded once to the output dtype)
A weight whose size is not a multiple of 64 is padded as bitsandbytes pads it: the last block is short (its
absmax is over its own elements) and the missing codes are those of 0.0 (index 7).

Rounding, as bitsandbytes 0.50's CPU path does it (and the tests check bit-equality against it):
  - 4-bit: w / absmax as w · (1/absmax) in full blocks and as a division in the short last block, clamped to
    [-1, 1], then the NF4 index whose midpoint interval holds it (ties to the lower index);
  - 8-bit absmaxes: v = x · (1/absmax2) clamped, then a 65,536-entry table over [-1, 1] (index
    ⌊(v + 1)·0.5·65535 + 0.5⌋) whose entries are the nearest DYN value to each grid point; an all-zero block of
    256 gets codes 0 and absmax2 0.
Quantization runs once, when a model is loaded, in torch; dequantization, every forward and backward, has a
Triton kernel (one program dequantizes BLOCKS_PER_PROGRAM blocks of 64) beside its torch reference.

Torch reference first (the spec), then the Triton kernel, its launcher and the public function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import tl, triton

BLOCK = 64  # weights per absmax (QLoRA's blocksize)
SCALE_BLOCK = 256  # absmaxes per second-level scale (QLoRA's double quantization)
BYTES_PER_BLOCK = BLOCK // 2

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA, appendix E);
# the fp32 values bitsandbytes ships.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_LUT_SIZE = 65536  # bitsandbytes' CPU quantizer rounds v in [-1, 1] to this grid before looking its code up


def nf4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561) that bitsandbytes quantizes absmaxes
    with: for e = 0..6, 2^e values ±10^(e−6)·m, m the midpoints of 2^e equal steps of [0.1, 1]; then 0 and 1;
    sorted, 256 in all. Built in the same arithmetic as bitsandbytes' (fp32 midpoints, scaled in fp32)."""
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


class NF4Weight(NamedTuple):
    codes: torch.Tensor  # uint8 [blocks, 32]
    qabsmax: torch.Tensor  # uint8 [blocks]
    absmax2: torch.Tensor  # fp32 [ceil(blocks / 256)]
    offset: torch.Tensor  # fp32 []
    shape: torch.Size
    dtype: torch.dtype  # the dtype the weight had (and dequantizes to by default)


def _blocked_absmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n] fp32 -> (x zero-padded to [blocks, block], absmax [blocks])."""
    blocks = -(-x.numel() // block)
    padded = torch.nn.functional.pad(x, (0, blocks * block - x.numel())).view(blocks, block)
    return padded, padded.abs().amax(dim=1)


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax [blocks] fp32 -> (qabsmax uint8 [blocks], absmax2 fp32 [ceil(blocks/256)], offset fp32 [])."""
    offset = absmax.mean()
    centred, absmax2 = _blocked_absmax(absmax - offset, SCALE_BLOCK)
    dyn = dynamic_map(absmax.device)
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=absmax.device)) / (_LUT_SIZE - 1)
    lut = torch.bucketize(grid, (dyn[:-1] + dyn[1:]) * 0.5)  # nearest DYN index of each grid point
    inv = torch.where(absmax2 > 0, 1.0 / absmax2, 0.0)  # an all-equal block of 256 (norm weights): codes 0
    v = (centred * inv[:, None]).clamp(-1.0, 1.0)
    q = lut[((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).long()]
    q = torch.where(absmax2[:, None] == 0, 0, q)
    return q.reshape(-1)[: absmax.numel()].to(torch.uint8), absmax2, offset


def quantize_nf4(w: torch.Tensor, name: str = "weight") -> NF4Weight:
    """w (fp32, bf16 or fp16, any shape) -> its NF4 codes and double-quantized scales."""
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_nf4: {name} must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: {name} is empty (shape {tuple(w.shape)})")
    x = w.detach().reshape(-1).float()
    n = x.numel()
    blocks, absmax = _blocked_absmax(x, BLOCK)
    full = n // BLOCK
    safe = absmax.clamp(min=1e-38)
    scaled = torch.empty_like(blocks)
    scaled[:full] = blocks[:full] * (1.0 / safe[:full, None])
    if full < blocks.shape[0]:  # the short last block: bitsandbytes divides here instead
        scaled[full:] = blocks[full:] / safe[full:, None]
    nf4 = nf4_table(w.device)
    q = torch.bucketize(scaled.clamp(-1.0, 1.0), (nf4[:-1] + nf4[1:]) / 2).to(torch.uint8)  # [blocks, 64]
    codes = (q[:, 0::2] << 4) | q[:, 1::2]  # [blocks, 32]: the earlier element in the high nibble
    qabsmax, absmax2, offset = _quantize_absmax(absmax)
    return NF4Weight(codes, qabsmax, absmax2, offset, w.shape, w.dtype)


def nf4_absmax_reference(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The blocks' absmaxes, fp32 [blocks], from their double quantization."""
    scale = absmax2[:, None].expand(-1, SCALE_BLOCK).reshape(-1)[: qabsmax.numel()]
    return _tables(qabsmax.device)[1][qabsmax.long()] * scale + offset


def dequantize_nf4_reference(
    codes: torch.Tensor,
    qabsmax: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """codes uint8 [blocks, 32] and scales -> the weight [shape] in `dtype`."""
    absmax = nf4_absmax_reference(qabsmax, absmax2, offset)
    # one lookup per byte: its (high, low) nibbles' NF4 values, [blocks, 32, 2] -> [blocks, 64] in element order
    pairs = _tables(codes.device)[2][codes.long()].view(codes.shape[0], BLOCK)
    w = pairs * absmax[:, None]
    n = int(torch.Size(shape).numel())
    return w.reshape(-1)[:n].to(dtype).reshape(shape)


def dequantize_nf4_weight(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequantize_nf4_reference(q.codes, q.qabsmax, q.absmax2, q.offset, q.shape, dtype or q.dtype)


# ---------------------------------------------------------------------------------------------------------
# Triton kernel: program p dequantizes blocks [p·R, (p+1)·R), R = BLOCKS_PER_PROGRAM, each block 32 code
# bytes -> 64 weights. codes [blocks, 32] contiguous (stride 32), out flat [n] contiguous.


# fmt: off
@triton.jit
def _round_to_bf16_bits(x):
    # fp32 -> the bits of the nearest bf16, ties to even (finite x): what torch's .to(bfloat16) and
    # bitsandbytes' CPU kernels give. Done in integers because Triton's interpreter truncates instead.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).to(tl.int16)


@triton.jit
def _nf4_dequant_kernel(
    codes_ptr, qabsmax_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn_ptr, out_ptr, n_blocks, n_elements,
    BLOCKS_PER_PROGRAM: tl.constexpr, SCALE_BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [R]
    blk_mask = blk < n_blocks
    # absmax_b = DYN[qabsmax_b] · absmax2[b // 256] + offset
    qa = tl.load(qabsmax_ptr + blk, mask=blk_mask, other=0).to(tl.int32)
    scale2 = tl.load(absmax2_ptr + blk // SCALE_BLOCK, mask=blk_mask, other=0.0)
    absmax = tl.load(dyn_ptr + qa) * scale2 + tl.load(offset_ptr)  # [R]
    byte = tl.arange(0, 32)
    code = tl.load(codes_ptr + blk[:, None] * 32 + byte[None, :], mask=blk_mask[:, None], other=0).to(tl.int32)
    hi = tl.load(nf4_ptr + (code >> 4)) * absmax[:, None]  # [R, 32]: elements 2j
    lo = tl.load(nf4_ptr + (code & 15)) * absmax[:, None]  # elements 2j + 1
    if OUT_BF16:  # out is bf16 storage viewed as int16; rounded to nearest even in integers
        hi = _round_to_bf16_bits(hi)
        lo = _round_to_bf16_bits(lo)
    first = blk[:, None] * 64 + 2 * byte[None, :]
    tl.store(out_ptr + first, hi.to(out_ptr.dtype.element_ty), mask=first < n_elements)
    tl.store(out_ptr + first + 1, lo.to(out_ptr.dtype.element_ty), mask=first + 1 < n_elements)
# fmt: on


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _settings() -> tuple[int, int]:
    """BLOCKS_PER_PROGRAM and num_warps. 32 blocks = 2,048 weights a program: 1 KiB of codes in, 4 KiB of
    bf16 out over 4 warps (16 weights a thread); a 4096 x 4096 weight is 8,192 programs. Chosen by reasoning,
    not swept (benchmarks/nf4.py measures it)."""
    return 32, 4


def _check(
    codes: torch.Tensor, qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
) -> None:
    op = "dequantize_nf4"
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != BYTES_PER_BLOCK:
        raise ValueError(f"{op}: codes must be uint8 [blocks, 32], got {codes.dtype} {tuple(codes.shape)}")
    if qabsmax.dtype != torch.uint8 or qabsmax.shape != codes.shape[:1]:
        raise ValueError(f"{op}: qabsmax must be uint8 [{codes.shape[0]}], got {qabsmax.dtype} {tuple(qabsmax.shape)}")
    if absmax2.dtype != torch.float32 or absmax2.numel() != -(-codes.shape[0] // SCALE_BLOCK):
        raise ValueError(
            f"{op}: absmax2 must be float32 [ceil(blocks / 256)], got {absmax2.dtype} {tuple(absmax2.shape)}"
        )
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError(f"{op}: offset must be one float32, got {offset.dtype} {tuple(offset.shape)}")
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: the output dtype must be float32, bfloat16 or float16, got {dtype}")
    for name, t in (("codes", codes), ("qabsmax", qabsmax), ("absmax2", absmax2)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()}")


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 [16], the dynamic map [256], and each byte's two NF4 values [256, 2] (high nibble first), per device."""
    if device not in _TABLES:
        nf4 = nf4_table(device)
        _TABLES[device] = (nf4, dynamic_map(device), torch.stack((nf4.repeat_interleave(16), nf4.repeat(16)), dim=-1))
    return _TABLES[device]


def dequantize_nf4(
    codes: torch.Tensor,
    qabsmax: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """codes uint8 [blocks, 32] and scales -> the weight [shape] in `dtype`, through the Triton kernel."""
    _check(codes, qabsmax, absmax2, offset, dtype)
    n = int(torch.Size(shape).numel())
    if not (codes.shape[0] - 1) * BLOCK < n <= codes.shape[0] * BLOCK:
        raise ValueError(f"dequantize_nf4: {codes.shape[0]} blocks cannot hold shape {tuple(shape)}")
    out = torch.empty(n, dtype=dtype, device=codes.device)
    bf16 = dtype == torch.bfloat16
    nf4, dyn, _ = _tables(codes.device)
    per_program, num_warps = _settings()
    # enable_fp_fusion=False: absmax = DYN·absmax2 + offset must round twice, as bitsandbytes does, not as
    # one FMA (the interpreter never fuses; a GPU build would)
    # fmt: off
    _nf4_dequant_kernel[(triton.cdiv(codes.shape[0], per_program),)](
        codes, qabsmax, absmax2, offset, nf4, dyn, out.view(torch.int16) if bf16 else out, codes.shape[0], n,
        BLOCKS_PER_PROGRAM=per_program, SCALE_BLOCK=SCALE_BLOCK, OUT_BF16=bf16, num_warps=num_warps,
        enable_fp_fusion=False,
    )
    # fmt: on
    return out.view(shape)
