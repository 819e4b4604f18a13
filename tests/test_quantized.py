"""NF4Linear (c2a/model/quantized.py): the frozen NF4 base layer. Forward and backward multiply by the
dequantized weight in the compute dtype (checked against float64 on the same dequantized weight), the weight
gets no gradient, and only the quantized weight is saved for the backward."""

from __future__ import annotations

import pytest
import torch

from c2a.kernels.nf4 import dequantize_nf4_weight, quantize_nf4
from c2a.model.quantized import NF4Linear
from c2a.plan.memory import nf4_bytes

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_forward_backward_use_the_dequantized_weight(dtype, kernels, monkeypatch):
    monkeypatch.setenv("C2A_KERNELS", kernels)
    w = 0.05 * torch.randn(70, 96)  # 105 blocks
    layer = NF4Linear.from_weight(w, "wq")
    x = torch.randn(3, 5, 96).to(dtype).requires_grad_()
    dy = torch.randn(3, 5, 70).to(dtype)
    y = layer(x)
    y.backward(dy)
    w_hat = dequantize_nf4_weight(quantize_nf4(w), dtype).double()  # what the layer must multiply by
    assert torch.equal(layer.dequantized(dtype), w_hat.to(dtype))
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w_hat.t()
    y64.backward(dy.double())
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=TOL[dtype], atol=TOL[dtype])
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())


def test_only_the_quantized_weight_is_saved_for_backward():
    layer = NF4Linear.from_weight(0.05 * torch.randn(256, 512))
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert saved and all(t.dtype in (torch.uint8, torch.float32) and t.numel() <= 256 * 512 // 2 for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 256 * 512 * 0.6  # codes + scales, no [256, 512]


def test_storage_is_half_a_byte_a_weight_plus_scales():
    layer = NF4Linear.from_weight(torch.randn(576, 576))
    blocks = 576 * 576 // 64
    sizes = {n: t.numel() * t.element_size() for n, t in layer.state_dict().items()}
    assert sizes == {"codes": blocks * 32, "qabsmax": blocks, "absmax2": 4 * 21, "offset": 4}


@pytest.mark.parametrize("shape", [(576, 576), (4096, 11008), (7, 13), (1, 64)], ids=str)
def test_planner_nf4_bytes_are_the_layers_storage(shape):
    layer = NF4Linear(shape[1], shape[0], device="meta")  # shapes only: a 7B projection allocates nothing
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert nf4_bytes(shape[0] * shape[1]) == stored
    padded = -(-shape[0] * shape[1] // 64) * 64  # a short last block is stored whole
    assert stored < 0.53 * padded + 12  # 0.5 a weight + about 1/64 for the scales


def test_refuses_a_weight_that_is_not_a_matrix():
    with pytest.raises(
        ValueError, match=r"NF4Linear: layers.0.attention_norm must be a matrix \[out, in\], got shape \(64,\)"
    ):
        NF4Linear.from_weight(torch.ones(64), "layers.0.attention_norm")
