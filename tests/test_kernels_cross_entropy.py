"""Fused linear cross-entropy against the float64 reference: loss, dh, dW; ignored targets, chunking,
normalisers, which inputs want gradients, and that nothing reads a device value on the host."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from kernel_checks import DEVICE, DTYPES, assert_within_torch_error, count_launches, poisoned_empty  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from c2a.kernels import cross_entropy
from c2a.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference


def problem(N: int, D: int, V: int, dtype: torch.dtype, ignored: float = 0.3):
    """h, W scaled so the logits spread over several units (a peaked softmax, as in a trained model),
    labels with a fraction set to -100."""
    h = torch.randn(N, D, device=DEVICE).to(dtype)
    w = (torch.randn(V, D, device=DEVICE) * 2 / D**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < ignored] = IGNORE_INDEX
    return h, w, labels


def run(fn, h, w, labels, grad_h: bool = True, grad_w: bool = True, scale: float = 1.0, **kwargs):
    h = h.detach().clone().requires_grad_(grad_h)
    w = w.detach().clone().requires_grad_(grad_w)
    loss = fn(h, w, labels, **kwargs)
    if grad_h or grad_w:
        (loss * scale).backward()
    return loss, h.grad, w.grad


def check_against_float64(h, w, labels, grad_h=True, grad_w=True, scale=1.0, chunk_size=None, **kwargs):
    loss, dh, dw = run(linear_cross_entropy, h, w, labels, grad_h, grad_w, scale, chunk_size=chunk_size, **kwargs)
    loss_t, dh_t, dw_t = run(linear_cross_entropy_reference, h, w, labels, grad_h, grad_w, scale, **kwargs)
    loss64, dh64, dw64 = run(
        linear_cross_entropy_reference, h.double(), w.double(), labels, grad_h, grad_w, scale, **kwargs
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_within_torch_error("loss", loss, loss_t, loss64)
    if grad_h:
        assert_within_torch_error("dh", dh, dh_t, dh64)
    else:
        assert dh is None
    if grad_w:
        assert_within_torch_error("dW", dw, dw_t, dw64)
    else:
        assert dw is None
    return loss


# Chunks whose boundaries fall at odd rows. With V = 32000 the dh GEMM sums 32000-long dot products, and
# on CPU the BLAS picks its kernel by the row count: for rows not a multiple of 4 it sums them 5-10x less
# accurately (measured: 1.1e-8 at 4 rows, 1.3e-7 at 2 or 7 rows, same data). So the 32000-vocab case uses
# 12 rows in chunks of 8 and 4 (the reference's GEMM has 12), lest the test measure the BLAS, not the kernel.
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N, D, V, chunk",
    [(1, 80, 1000, None), (7, 80, 1000, 3), (129, 80, 1000, 50), (7, 4097, 1000, 4), (12, 80, 32000, 8)],
    ids=["1tok", "7tok-chunk3", "129tok-chunk50", "hidden4097", "vocab32000"],
)
def test_linear_cross_entropy_matches_float64(N, D, V, chunk, dtype, monkeypatch):
    launches = count_launches(monkeypatch, cross_entropy, "_cross_entropy_chunk_kernel")
    h, w, labels = problem(N, D, V, dtype)
    check_against_float64(h, w, labels, chunk_size=chunk)
    assert launches.launches == -(-N // (chunk or N))  # one launch per chunk; the default chunk covers N < 256


@pytest.mark.usefixtures("poisoned_empty")
def test_all_ignored_gives_zero_not_nan():
    h, w, labels = problem(7, 80, 1000, torch.float32, ignored=1.0)
    loss, dh, dw = run(linear_cross_entropy, h, w, labels, chunk_size=3)
    assert loss.item() == 0.0
    assert torch.all(dh == 0) and torch.all(dw == 0)


@pytest.mark.parametrize(
    "normalizer", [None, 11.0, torch.tensor(11), torch.tensor(11.0)], ids=["count", "float", "int-tensor", "tensor"]
)
def test_normalizer_and_grad_output(normalizer):
    """The divisor from outside (gradient accumulation, data parallel) and a loss scaled before backward."""
    h, w, labels = problem(9, 80, 1000, torch.float32)
    normalizer = normalizer.to(DEVICE) if isinstance(normalizer, torch.Tensor) else normalizer
    check_against_float64(h, w, labels, scale=2.5, chunk_size=4, normalizer=normalizer)


@pytest.mark.parametrize("grad_h, grad_w", [(True, False), (False, True)])
def test_only_some_inputs_want_gradients(grad_h, grad_w, monkeypatch):
    """A frozen head (W without grad) and a frozen trunk (h without grad); the skipped GEMM never runs."""
    h, w, labels = problem(9, 80, 1000, torch.float32)
    calls = {"addmm": 0}
    real = cross_entropy._addmm_fp32_
    monkeypatch.setattr(
        cross_entropy, "_addmm_fp32_", lambda *a: (calls.__setitem__("addmm", calls["addmm"] + 1), real(*a))
    )
    check_against_float64(h, w, labels, grad_h=grad_h, grad_w=grad_w, chunk_size=4)
    assert calls["addmm"] == (3 if grad_w else 0)


def test_no_grad_gives_the_loss_without_gradient_work(monkeypatch):
    """Evaluation: under no_grad (inputs that would require grad included) only the loss is computed."""
    h, w, labels = problem(9, 80, 1000, torch.float32)
    launches = count_launches(monkeypatch, cross_entropy, "_cross_entropy_chunk_kernel")
    dw_gemms = []
    real = cross_entropy._addmm_fp32_
    monkeypatch.setattr(cross_entropy, "_addmm_fp32_", lambda *a: (dw_gemms.append(1), real(*a)))
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), labels, chunk_size=4)
    torch.testing.assert_close(
        loss, linear_cross_entropy_reference(h.detach(), w.detach(), labels), rtol=1e-6, atol=1e-6
    )
    assert not loss.requires_grad
    assert launches.launches == 3 and not any(kw["COMPUTE_GRAD"] for kw in launches.kwargs) and not dw_gemms


def test_no_host_reads(monkeypatch):
    """No .item(), bool(), int() or float() of a tensor anywhere in forward or backward: on a GPU each
    would stall the host until the device catches up."""

    def host_read(*args, **kwargs):
        raise AssertionError("linear_cross_entropy read a tensor's value on the host")

    h, w, labels = problem(9, 80, 1000, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss = linear_cross_entropy(h, w, labels, torch.tensor(7.0, device=DEVICE), chunk_size=4)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss).item() and h.grad is not None and w.grad is not None


def test_out_of_range_target_makes_the_loss_nan():
    h, w, labels = problem(5, 80, 1000, torch.float32, ignored=0.0)
    labels[2] = 1000
    assert linear_cross_entropy(h, w, labels).isnan().item()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long)),
            r"h must be \[N, D\] and weight \[V, D\]",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)),
            r"labels must be \[N\] = \[4\], got \(5,\)",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 8).half(), torch.zeros(4, dtype=torch.long)),
            "h and weight must share a dtype",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)),
            "labels must be int64 or int32, got torch.float32",
        ),
    ],
    ids=["shapes", "labels-shape", "dtype", "labels-dtype"],
)
def test_rejects_bad_inputs(make, message):
    h, w, labels = (t.to(DEVICE) for t in make())
    with pytest.raises((ValueError, TypeError), match=f"linear_cross_entropy: {message}"):
        linear_cross_entropy(h, w, labels)


def test_rejects_bad_normalizer():
    h, w, labels = problem(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="linear_cross_entropy: normalizer must be positive, got 0"):
        linear_cross_entropy(h, w, labels, 0)
    with pytest.raises(ValueError, match="linear_cross_entropy: normalizer must be a number or a one-element tensor"):
        linear_cross_entropy(h, w, labels, torch.ones(2, device=DEVICE))


class FreshTensors(TorchDispatchMode):
    """Records the dtype of every tensor of `shape` an op allocates (an output that aliases none of the op's
    inputs: `out=` results and views are not new memory)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.dtypes = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and tuple(t.shape) == self.shape
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.dtypes.append(t.dtype)
        return out


def test_weight_gradient_is_made_once():
    """In half precision the [V, D] weight gradient costs its fp32 accumulator and one result in W's dtype,
    scaled by grad_output as it is rounded: no rounded copy in the forward and no second, scaled copy in
    the backward (at 13B, V 32000 x D 5120 in bf16: 655 MB + 328 MB instead of 655 + 328 + 328 MB)."""
    V, D = 1000, 80
    h, w, labels = problem(9, D, V, torch.float16)
    h.requires_grad_()
    w.requires_grad_()
    with FreshTensors((V, D)) as fresh:
        loss = linear_cross_entropy(h, w, labels, chunk_size=4)
        (2.5 * loss).backward()
    assert fresh.dtypes == [torch.float32, torch.float16]
    _loss_t, _, dw_t = run(linear_cross_entropy_reference, h, w, labels, scale=2.5)
    _, _, dw64 = run(linear_cross_entropy_reference, h.double(), w.double(), labels, scale=2.5)
    assert_within_torch_error("dW", w.grad, dw_t, dw64)


def test_retained_graph_backward_twice():
    """The stored gradients are scaled out of place: a second backward through a retained graph gives the
    same gradient again (accumulated twice), not the first one scaled again."""
    h, w, labels = problem(9, 80, 1000, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=4)
    (3.0 * loss).backward(retain_graph=True)
    once_h, once_w = h.grad.clone(), w.grad.clone()
    (3.0 * loss).backward()
    torch.testing.assert_close(h.grad, 2 * once_h)
    torch.testing.assert_close(w.grad, 2 * once_w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignored_rows_never_read_their_logits(dtype, monkeypatch):
    """A prompt row's logits are not read by the kernel (it only writes the zero gradient row): poisoned with
    NaN after the GEMM, they leave the loss and both gradients equal to the reference's."""
    h, w, labels = problem(11, 80, 1000, dtype, ignored=0.5)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    real, seen = cross_entropy._mm_fp32, []

    def poisoned(a, b, out):
        real(a, b, out=out)
        start = sum(seen)
        seen.append(a.shape[0])
        out[labels[start : start + a.shape[0]] == IGNORE_INDEX] = float("nan")
        return out

    monkeypatch.setattr(cross_entropy, "_mm_fp32", poisoned)
    check_against_float64(h, w, labels, chunk_size=4)
    assert seen == [4, 4, 3]


def test_every_launch_pins_fp_fusion(monkeypatch):
    """The kernels rely on mul + add contracting to FMAs, which Triton 3.10 stops doing by default: every
    launch asks for it (see c2a/kernels/__init__.py)."""
    launches = count_launches(monkeypatch, cross_entropy, "_cross_entropy_chunk_kernel")
    h, w, labels = problem(9, 80, 1000, torch.float32)
    run(linear_cross_entropy, h, w, labels, chunk_size=4)
    with torch.no_grad():
        linear_cross_entropy(h, w, labels)
    assert launches.launches == 4 and all(kw.get("enable_fp_fusion") is True for kw in launches.kwargs)


class StandInGemms:
    """torch.mm / torch.addmm that also take the fp32 out_dtype argument cuBLAS has and CPU lacks (computed
    as fp32 GEMMs of the upcast operands: the same arithmetic), so the CUDA branches run on CPU.
    `addmm_error` makes the out_dtype addmm raise it, as a torch without that overload would."""

    def __init__(self, monkeypatch, addmm_error: Exception | None = None) -> None:
        self.mm, self.addmm = torch.mm, torch.addmm
        self.calls: list[str] = []
        self.addmm_error = addmm_error
        monkeypatch.setattr(cross_entropy, "_has_fp32_out_gemm", lambda t: True)
        monkeypatch.setattr(cross_entropy, "_ADDMM_OUT_DTYPE_OK", True)
        monkeypatch.setattr(torch, "mm", self.stand_in_mm)
        monkeypatch.setattr(torch, "addmm", self.stand_in_addmm)

    def stand_in_mm(self, a, b, *out_dtype, out=None):
        if not out_dtype:
            return self.mm(a, b, out=out)
        self.calls.append("mm fp32-out")
        result = self.mm(a.float(), b.float())
        return result if out is None else out.copy_(result)

    def stand_in_addmm(self, acc, a, b, *out_dtype, out=None):
        if not out_dtype:
            return self.addmm(acc, a, b, out=out)
        self.calls.append("addmm fp32-out")
        if self.addmm_error is not None:
            raise self.addmm_error
        return out.copy_(self.addmm(acc, a.float(), b.float()))


def test_cuda_gemm_branch(monkeypatch):
    """The CUDA path's fp32-output GEMMs (forced on CPU with stand-ins): logits and dW in one GEMM each per
    chunk, results equal to the float64 reference's within torch's own fp16 error."""
    gemms = StandInGemms(monkeypatch)
    h, w, labels = problem(9, 80, 1000, torch.float16)
    check_against_float64(h, w, labels, chunk_size=4)
    assert gemms.calls == ["mm fp32-out", "addmm fp32-out"] * 3 and cross_entropy._ADDMM_OUT_DTYPE_OK


def test_cuda_addmm_without_fp32_out_falls_back_once(monkeypatch, caplog):
    """A torch whose CUDA addmm refuses an fp32 accumulator (a RuntimeError before anything runs): mm + add
    from then on, said once in the log, with the same results."""
    gemms = StandInGemms(monkeypatch, addmm_error=RuntimeError("addmm: out_dtype not supported"))
    h, w, labels = problem(9, 80, 1000, torch.float16)
    with caplog.at_level("WARNING", logger=cross_entropy.__name__):
        check_against_float64(h, w, labels, chunk_size=4)
    # chunk 1: logits, the refused addmm, its mm + add; chunks 2 and 3: logits, mm + add
    assert gemms.calls == ["mm fp32-out", "addmm fp32-out"] + ["mm fp32-out"] * 5
    assert not cross_entropy._ADDMM_OUT_DTYPE_OK and caplog.text.count("using mm + add") == 1


def test_cuda_addmm_out_of_memory_is_raised_not_a_fallback(monkeypatch):
    """Out of memory is a RuntimeError too, but says nothing about dtype support: it propagates and the
    fp32-accumulator GEMM stays in use."""
    StandInGemms(monkeypatch, addmm_error=torch.OutOfMemoryError("CUDA out of memory"))
    h, w, labels = problem(9, 80, 1000, torch.float16)
    with pytest.raises(torch.OutOfMemoryError):
        run(linear_cross_entropy, h, w, labels, chunk_size=4)
    assert cross_entropy._ADDMM_OUT_DTYPE_OK
