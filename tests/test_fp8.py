"""train.fp8: the block linears in float8 (c2a.kernels.fp8_linear).

The op against float64 on its dequantized operands (outputs and both gradients, odd shapes, per dtype); the
CPU matmul against torch._scaled_mm itself; the scaling rule against float8's own range (torch.finfo); and
the trainer: 20 steps of the demo model in fp8 within 1% of bf16's loss, a resume that ends bitwise where
the uninterrupted run does, and an export in bf16 with the bf16 run's tensor names. The planner's saved
activations shrink by what the float8 copies save."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from train_runs import checkpoint_tensors, metrics, run_train

from c2a.kernels.fp8_linear import (
    E4M3,
    E5M2,
    Float8Linear,
    fp8_linear,
    fp8_linear_reference,
    quantize,
    scaled_mm_reference,
)

SHAPES = [((37, 48), 40), ((3, 17, 96), 80)]  # x [..., K], N
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # of the largest |value|: fp32 or bf16 output rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_fp8_linear_against_float64(shape, dtype):
    (xs, n), g = shape, torch.Generator().manual_seed(0)
    x = torch.randn(*xs, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, xs[-1], generator=g) * 0.05).to(dtype).requires_grad_()
    dy = torch.randn(*xs[:-1], n, generator=g).to(dtype)
    y = fp8_linear(x, w)
    y.backward(dy)
    want = fp8_linear_reference(x.detach(), w.detach(), dy)
    for got, ref, name in ((y, want[0], "y"), (x.grad, want[1], "dx"), (w.grad, want[2], "dW")):
        assert got.dtype == dtype and got.shape == ref.shape, name
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err <= TOL[dtype], (name, float(err))
    # and float8 is what ran: the product is not the exact one (3 mantissa bits: errors of a few percent)
    exact = x.detach().double() @ w.detach().double().t()
    assert (y.double() - exact).abs().max() / exact.abs().max() > 1e-3


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kinds", [(E4M3, E4M3), (E5M2, E4M3)], ids=["e4m3", "e5m2-grad"])
def test_cpu_matmul_is_scaled_mm(kinds, out):
    g = torch.Generator().manual_seed(1)
    a, sa = quantize(torch.randn(37, 48, generator=g), kinds[0])
    b, sb = quantize(torch.randn(40, 48, generator=g), kinds[1])
    want = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out)
    got = scaled_mm_reference(a, b.t(), sa, sb, out)
    # the same fp32 sums in another order: within fp32 rounding, or one rounding to bf16 apart
    torch.testing.assert_close(got, want, rtol=1e-6 if out == torch.float32 else 2**-7, atol=1e-5)


def test_quantize_puts_the_largest_value_on_the_format_maximum():
    t = torch.tensor([[0.5, -3.0], [1e-9, 2.0]])
    for kind in (E4M3, E5M2):
        q, inv = quantize(t, kind)
        assert q.dtype == kind and q.float().abs().max() == torch.finfo(kind).max
        assert inv == pytest.approx(3.0 / torch.finfo(kind).max)
    q, inv = quantize(torch.zeros(4, 4), E4M3)
    assert torch.isfinite(inv) and (q.float() == 0).all()


def test_float8_linear_keeps_the_linear_state():
    lin = torch.nn.Linear(16, 32, bias=False)
    names = dict(lin.state_dict())
    lin.__class__ = Float8Linear
    assert dict(lin.state_dict()).keys() == names.keys() and lin(torch.randn(2, 16)).shape == (2, 32)


RUN = [
    "--train.max_steps=20",
    "--train.save_every=10",
    "--train.lr=3e-3",
    "--train.dtype=bf16",
    "--train.micro_batch=2",
    "--train.global_batch=4",
    # "within 1% after 20 steps" is judged on the held-out loss of the model at steps 10 and 20 (292 targets,
    # summed in fp32): a single training step's loss is one 4-row batch's, rounded to bf16, and moves ~2%
    # between the runs from batch to batch
    "--data.val_fraction=0.25",
    "--eval.every=10",
]


def test_fp8_trains_like_bf16_resumes_and_exports_bf16(tmp_path):
    run_train(1, tmp_path / "bf16", *RUN)
    run_train(1, tmp_path / "fp8", *RUN, "--train.fp8=true")
    bf16 = [r["loss"] for r in metrics(tmp_path / "bf16") if "loss" in r]
    fp8 = [r["loss"] for r in metrics(tmp_path / "fp8") if "loss" in r]
    assert len(fp8) == 20 and fp8 != bf16  # float8 ran
    val_bf16 = [r["val_loss"] for r in metrics(tmp_path / "bf16") if "val_loss" in r]
    val_fp8 = [r["val_loss"] for r in metrics(tmp_path / "fp8") if "val_loss" in r]
    assert len(val_fp8) == len(val_bf16) == 2 and val_fp8 != val_bf16
    assert val_fp8 == pytest.approx(val_bf16, rel=0.01)
    assert val_fp8[-1] < 0.7 * fp8[0] and fp8[-1] < 0.7 * fp8[0]  # it learned
    # resume from step 10: the same final weights and optimizer state, bit for bit
    shutil.copytree(tmp_path / "fp8", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000020")
    shutil.rmtree(tmp_path / "resumed" / "final")
    proc = run_train(1, tmp_path / "resumed", *RUN, "--train.fp8=true")
    assert "step_00000010" in proc.stdout + proc.stderr
    last = "checkpoints/step_00000020"
    whole = checkpoint_tensors(tmp_path / "fp8" / last, tmp_path / "fp8")
    resumed = checkpoint_tensors(tmp_path / "resumed" / last, tmp_path / "resumed")
    for name, t in whole["model"].items():
        assert torch.equal(resumed["model"][name], t), name
        assert torch.equal(resumed["optim"]["state"][name]["exp_avg"], whole["optim"]["state"][name]["exp_avg"])
    # the export: bf16 tensors under the bf16 run's names, loadable as any final/
    exported = {}
    for run in ("bf16", "fp8"):
        with safe_open(str(tmp_path / run / "final" / "model.safetensors"), "pt") as f:
            exported[run] = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert exported["fp8"] == exported["bf16"] and set(exported["fp8"].values()) == {torch.bfloat16}
    config = json.loads((tmp_path / "fp8" / "final" / "config.json").read_text())
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"


def test_the_planner_counts_float8_inputs():
    from c2a.config import LlamaConfig
    from c2a.plan.memory import Workload, block_saved_bytes

    m = LlamaConfig.from_name("llama2-7b")
    for backend in ("triton", "torch"):
        bf16 = block_saved_bytes(Workload(m, 1, 2048, backend=backend))
        fp8 = block_saved_bytes(Workload(m, 1, 2048, backend=backend, fp8=True))
        # bf16 normed, FFN-normed and SwiGLU output (2 bytes each) become float8 copies: 3+2+1 of dim, 1 of F
        assert fp8 - bf16 == (6 * m.dim + m.ffn_hidden_dim) - 2 * (2 * m.dim + m.ffn_hidden_dim)
