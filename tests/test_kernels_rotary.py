"""Triton rotary embedding against a float64 rotation: q and k in one launch, GQA, packed positions."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_within_torch_error, count_launches, poisoned_empty  # noqa: F401

from c2a.kernels import rotary
from c2a.kernels.rotary import apply_rotary, rotary_angles, rotary_reference

THETA = 10000.0


def rotary_float64(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation in float64. The angles are the spec's fp32 ones (Meta and HF compute them in fp32, and a
    model trained with them expects exactly those); only the rotation itself is exact here."""
    cos, sin = (t.double()[:, :, None, :] for t in rotary_angles(position_ids, q.shape[-1], THETA))  # [B, T, 1, Hd/2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.double().unflatten(-1, (-1, 2))  # [B, T, heads, Hd/2, 2]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    return rotate(q), rotate(k)


def packed_positions(B: int, T: int) -> torch.Tensor:
    """Rows of packed documents whose positions restart at 0, starting high enough that fp32 angles are
    large (up to ~4000 rad) as in long sequences."""
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randint(1, T, (2,)).tolist()) if T > 2 else []
        starts = [0, *cuts, T]
        row = torch.cat([torch.arange(e - s) for s, e in zip(starts, starts[1:])])
        rows.append(row + (4000 if B == 1 else 0))
    return torch.stack(rows).to(DEVICE)


def run(fn, q, k, pos, dq, dk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, pos)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo, ko, q.grad, k.grad


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, T, H, K, Hd",
    [(1, 1, 4, 4, 16), (1, 7, 6, 2, 80), (3, 43, 4, 1, 16), (2, 7, 5, 5, 8)],
    ids=["1tok-mha", "7tok-gqa-hd80", "129tok-mqa", "odd-heads"],
)
def test_rotary_matches_float64(B, T, H, K, Hd, dtype, monkeypatch):
    launches = count_launches(monkeypatch, rotary, "_rotary_kernel")
    q = torch.randn(B, T, H, Hd, device=DEVICE).to(dtype)
    k = torch.randn(B, T, K, Hd, device=DEVICE).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = packed_positions(B, T)
    qo, ko, gq, gk = run(lambda q, k, p: apply_rotary(q, k, p, THETA), q, k, pos, dq, dk)
    assert launches.launches == 2  # one launch for q and k together, forward and backward
    qt, kt, gqt, gkt = run(lambda q, k, p: rotary_reference(q, k, p, THETA), q, k, pos, dq, dk)
    q64, k64, gq64, gk64 = run(rotary_float64, q.double(), k.double(), pos, dq.double(), dk.double())
    for name, out, ref_t, ref64 in [
        ("q", qo, qt, q64),
        ("k", ko, kt, k64),
        ("dq", gq, gqt, gq64),
        ("dk", gk, gkt, gk64),
    ]:
        assert_within_torch_error(name, out, ref_t, ref64)


def test_rotary_positions_come_from_position_ids():
    """Broadcast positions (stride 0, as the model's arange(T).expand(B, T)), strided positions, and a
    document restart: the second document's tokens rotate exactly as if they began their own row."""
    B, T, H, Hd = 2, 6, 2, 8
    q = torch.randn(B, T, H, Hd, device=DEVICE)
    expanded = torch.arange(T, device=DEVICE).expand(B, T)
    qo, _ = apply_rotary(q, q[:, :, :1].contiguous(), expanded, THETA)
    qt, _ = rotary_reference(q, q[:, :, :1], expanded, THETA)
    torch.testing.assert_close(qo, qt, rtol=1e-6, atol=1e-6)
    strided = torch.randint(0, 4096, (B, 2 * T), device=DEVICE)[:, ::2]  # strides (2T, 2)
    qo, _ = apply_rotary(q, q, strided, THETA)
    torch.testing.assert_close(qo, rotary_reference(q, q, strided, THETA)[0], rtol=1e-5, atol=1e-5)
    restart = torch.tensor([[0, 1, 2, 0, 1, 2]] * B, device=DEVICE)
    qo, _ = apply_rotary(q, q, restart, THETA)
    torch.testing.assert_close(qo[:, 3], q[:, 3], rtol=0, atol=0)
    second_doc = q[:, 3:].contiguous()  # rotated on its own, from position 0
    torch.testing.assert_close(
        qo[:, 3:], apply_rotary(second_doc, second_doc, restart[:, :3], THETA)[0], rtol=0, atol=0
    )


def test_rotary_backward_is_rotation_by_minus_theta():
    """For a rotation R, dq = Rᵀ·g: rotating the kernel's forward output back gives the input exactly."""
    q = torch.randn(1, 5, 3, 16, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    pos = torch.arange(5, device=DEVICE)[None] * 37
    qo, _ = apply_rotary(q, q.detach().clone(), pos, THETA)
    (back,) = torch.autograd.grad(qo, q, grad_outputs=qo.detach())
    torch.testing.assert_close(back, q.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: (torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7), torch.zeros(1, 2, dtype=torch.long)),
            "head dim must be even",
        ),
        (
            lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), torch.zeros(1, 2, dtype=torch.long)),
            r"k must be \[B, T, K, Hd\]",
        ),
        (
            lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8).half(), torch.zeros(1, 2, dtype=torch.long)),
            "q and k must share a dtype",
        ),
        (
            lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.zeros(2, 1, dtype=torch.long)),
            r"position_ids must be \[B, T\] = \[1, 2\], got \(2, 1\)",
        ),
        (
            lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.zeros(1, 2)),
            "position_ids must be int64 or int32, got torch.float32",
        ),
        (
            lambda: (
                torch.randn(1, 4, 2, 8).transpose(1, 2),
                torch.randn(1, 2, 2, 8),
                torch.zeros(1, 2, dtype=torch.long),
            ),
            "q must have contiguous",
        ),
    ],
    ids=["odd-head-dim", "k-shape", "dtype", "position-shape", "position-dtype", "strides"],
)
def test_rotary_rejects_bad_inputs(make, message):
    q, k, pos = (t.to(DEVICE) for t in make())
    with pytest.raises((ValueError, TypeError), match=f"apply_rotary: {message}"):
        apply_rotary(q, k, pos, THETA)


# Llama-3.1's scaling with a 64-token original context at Hd 16 and theta 1e4: the pair wavelengths 6.3, 20,
# 63, 199, ... tokens put pair 0 above the high-frequency cut (64/4), pairs 1-2 in the blend and the rest
# below the low-frequency cut (64/1), so every branch of the rule reaches the kernel.
SCALING = rotary.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)


def test_llama3_frequencies_follow_the_rule():
    """Each pair's frequency from the three-branch rule written out in float64 here, wavelength by wavelength."""
    import math

    plain = rotary.rotary_inv_freq(16, THETA, torch.device("cpu")).double()
    scaled = rotary.rotary_inv_freq(16, THETA, torch.device("cpu"), SCALING).double()
    s, lo, hi, L = SCALING
    for f, got in zip(plain.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < L / hi:
            want = f
        elif wavelen > L / lo:
            want = f / s
        else:
            a = (L / wavelen - lo) / (hi - lo)
            want = (1 - a) * f / s + a * f
        assert got == pytest.approx(want, rel=1e-6)
    assert scaled[0] == plain[0] and scaled[-1].item() == pytest.approx(plain[-1].item() / 8, rel=1e-6)
    assert plain[1] / 8 < scaled[1] < plain[1]  # blended


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_llama3_scaling_matches_float64(dtype):
    """The kernel with scaled frequencies against the float64 rotation by the reference's scaled angles, and
    visibly different from plain rope (positions up to 4000, well past the original context)."""
    B, T, H, K, Hd = 2, 19, 4, 2, 16
    q = torch.randn(B, T, H, Hd, device=DEVICE).to(dtype)
    k = torch.randn(B, T, K, Hd, device=DEVICE).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = packed_positions(1, T).expand(B, T).contiguous()
    qo, ko, gq, gk = run(lambda q, k, p: apply_rotary(q, k, p, THETA, SCALING), q, k, pos, dq, dk)
    qt, kt, gqt, gkt = run(lambda q, k, p: rotary_reference(q, k, p, THETA, SCALING), q, k, pos, dq, dk)
    cos, sin = (t.double()[:, :, None, :] for t in rotary_angles(pos, Hd, THETA, SCALING))

    def rotate(x: torch.Tensor, sign: float) -> torch.Tensor:
        pairs = x.double().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - sign * x1 * sin, sign * x0 * sin + x1 * cos), dim=-1).flatten(-2)

    for name, out, ref_t, ref64 in [
        ("q", qo, qt, rotate(q, 1)),
        ("k", ko, kt, rotate(k, 1)),
        ("dq", gq, gqt, rotate(dq, -1)),
        ("dk", gk, gkt, rotate(dk, -1)),
    ]:
        assert_within_torch_error(name, out, ref_t, ref64)
    plain_q, _ = apply_rotary(q, k, pos, THETA)
    assert (plain_q.float() - qo.float()).abs().max() > 0.1


def test_rotary_rejects_bad_scaling():
    q = torch.randn(1, 2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="apply_rotary: scaling needs factor >= 1"):
        apply_rotary(
            q, q, torch.zeros(1, 2, dtype=torch.long, device=DEVICE), THETA, SCALING._replace(high_freq_factor=0.5)
        )


def rotary_by_selection(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> tuple:
    """The reference as it was written before it took the Rotation tables: x0 and x1 selected, rotated by the
    module docstring's formula in fp32, stacked back."""
    cos, sin = (t[:, :, None, :] for t in rotary_angles(position_ids, q.shape[-1], THETA))

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)

    return rotate(q), rotate(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B, T, H, K, Hd", [(1, 1, 4, 4, 16), (2, 37, 6, 2, 80), (3, 43, 4, 1, 8)], ids=str)
def test_rotary_reference_is_the_selecting_formula_bit_for_bit(B, T, H, K, Hd, dtype):
    """The reference's two products and one sum over the pairs give what selecting, rotating and stacking
    gives, outputs and gradients, to the bit (CPU: the torch path the trainer runs there)."""
    torch.manual_seed(3)
    q, k = torch.randn(B, T, H, Hd).to(dtype), torch.randn(B, T, K, Hd).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = packed_positions(B, T).cpu()
    ours = run(lambda q, k, p: rotary_reference(q, k, rotary.Rotation(p), THETA), q, k, pos, dq, dk)
    spec = run(rotary_by_selection, q, k, pos, dq, dk)
    for name, a, b in zip(("q", "k", "dq", "dk"), ours, spec):
        assert torch.equal(a, b), f"{name}: max difference {(a.float() - b.float()).abs().max()}"


def test_one_forward_computes_the_rotary_tables_once(monkeypatch):
    """Every layer of a forward, and the recompute of a checkpointed block, reuse the first layer's cos/sin."""
    from c2a.model.llama import Llama, LlamaConfig

    calls = []
    angles = rotary.rotary_angles
    monkeypatch.setattr(rotary, "rotary_angles", lambda *a, **kw: calls.append(1) or angles(*a, **kw))
    model = Llama(LlamaConfig(dim=32, n_layers=3, n_heads=2, n_kv_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (2, 9))
    model(ids).sum().backward()
    assert len(calls) == 1
