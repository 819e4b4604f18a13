"""The loss head over trained rows only, found without a host sync from the loader's host-side count
(`Llama.loss(..., num_trained=)`): the same loss and gradients as computing every row, and the head's GEMMs
really shrink to the trained rows."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import c2a.model.llama as llama
from c2a.config import LlamaConfig
from c2a.data.batching import MicroBatchLoader
from c2a.model import Llama

CFG = LlamaConfig(
    dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=97, max_seq_len=64
)  # Hd 16: Triton's smallest


def batch(trained_per_row: list[int], T: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt positions -100, then `n` trained targets, at the end of each row (as Alpaca examples are)."""
    ids = torch.randint(0, CFG.vocab_size, (len(trained_per_row), T))
    labels = torch.randint(0, CFG.vocab_size, (len(trained_per_row), T))
    for b, n in enumerate(trained_per_row):
        labels[b, : T - n] = -100
    return ids, labels


@pytest.mark.parametrize("trained", [[5, 0, 13], [0, 0, 0], [1, 2, 3]], ids=["mixed", "none", "few"])
def test_loss_and_gradients_equal_the_full_head(trained):
    model = Llama(CFG).double()
    ids, labels = batch(trained)
    n = sum(trained)
    results = []
    for kwargs in ({}, {"num_trained": n}):
        model.zero_grad()
        loss = model.loss(ids, labels, normalizer=7.0, **kwargs)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-12, atol=1e-12, msg=k)
    if n == 0:
        assert got.item() == 0.0


class HeadRows(TorchDispatchMode):
    """The rows of h [N, D] in every op that also takes the output head's weight [V, D]: the fused
    chunked loss (torch path) or the GEMMs around the Triton loss kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
        if func != torch.ops.aten.embedding.default and any(m.shape == (CFG.vocab_size, CFG.dim) for m in mats):
            self.rows += [m.shape[0] for m in mats if m.shape[1] == CFG.dim and m.shape[0] != CFG.vocab_size]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_head_runs_on_the_trained_rows_only_without_reading_labels_on_the_host(monkeypatch, kernels):
    monkeypatch.setenv("C2A_KERNELS", kernels)  # triton: the CUDA path's loss (its GEMMs around the kernel)
    model = Llama(CFG)
    ids, labels = batch([5, 0, 3])

    def no_host_read(*args):  # the CPU path's row selection reads the labels on the host: not taken
        raise AssertionError("_trained_rows called")

    monkeypatch.setattr(llama, "_trained_rows", no_host_read)
    with HeadRows() as seen:
        model.loss(ids, labels, num_trained=8).backward()
    assert seen.rows and set(seen.rows) == {8}, seen.rows  # every head GEMM has 8 rows, not 3 x 13


def test_the_loader_counts_trained_targets_on_the_host():
    class Data:
        lengths = (5, 7, 4, 9)

        def __getitem__(self, i):
            n = self.lengths[i]
            return list(range(1, n + 1)), [-100] * (n // 2) + list(range(n - n // 2))

        def __len__(self):
            return 4

    loader = MicroBatchLoader(Data(), seq_len=16, micro_batch_size=2, global_batch_rows=2, mode="packed")
    for b in loader:
        assert b.num_trained == int((b.labels != -100).sum()) > 0
        assert b.to("cpu").num_trained == b.num_trained
