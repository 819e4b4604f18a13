"""The Triton attention kernel inside c2a.model.Llama: a packed batch trains exactly like its documents alone.

The other ops (RMSNorm, rotary, SwiGLU, cross-entropy) stay on their torch references (C2A_KERNELS=torch) so
that a difference here can only come from attention; the model's attention call is routed to the kernel
and counted, so the test cannot pass on the reference by accident.
"""

from __future__ import annotations

import pytest
import torch

import c2a.kernels
import c2a.model.llama
from c2a.config import LlamaConfig
from c2a.kernels import attention
from c2a.kernels.attention import Documents, flash_attention
from c2a.model import Llama
from c2a.train.parallel import _checkpointed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=32)  # Hd 16, GQA 2:1
PAD = 0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Routes the model's attention to the Triton kernel; returns the list of documents it was called with."""
    calls = []

    def counting(q, k, v, documents):
        calls.append(documents)
        return flash_attention(q, k, v, documents)

    monkeypatch.setenv("C2A_KERNELS", "torch")
    monkeypatch.setattr(c2a.model.llama, "causal_attention", counting)
    return calls


def make_documents(lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per document; the first third of each document's targets is an untrained prompt."""
    docs = []
    for n in lengths:
        ids = torch.randint(1, CFG.vocab_size, (n,))
        labels = torch.randint(1, CFG.vocab_size, (n,))
        labels[: n // 3] = -100
        docs.append((ids, labels))
    return docs


def pack(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], T: int) -> tuple[torch.Tensor, ...]:
    """Rows of documents packed to length T, the rest a padding document (labels -100), as c2a packs them."""
    out = []
    for row in rows:
        used = sum(len(ids) for ids, _ in row)
        ids = torch.cat([d[0] for d in row] + [torch.full((T - used,), PAD)])
        labels = torch.cat([d[1] for d in row] + [torch.full((T - used,), -100)])
        pos = torch.cat([torch.arange(len(d[0])) for d in row] + [torch.arange(T - used)])
        out.append((ids, labels, pos))
    return tuple(torch.stack(x).to(DEVICE) for x in zip(*out))


def loss_and_grads(model: Llama, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model.loss(*args, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_equals_documents_alone(kernel_calls, monkeypatch):
    model = Llama(CFG).to(DEVICE)
    rows = [make_documents([7, 1, 19, 13, 8]), make_documents([30, 15])]
    ids, labels, pos = pack(rows, T=48)  # row 1 ends with a 3-token padding document
    n_targets = (labels != -100).sum()

    packed_loss, packed_grads = loss_and_grads(model, ids, labels, position_ids=pos)
    # one Documents object of these position_ids, shared by the layers
    assert len(kernel_calls) == CFG.n_layers and all(d is kernel_calls[0] for d in kernel_calls)
    assert isinstance(kernel_calls[0], Documents) and kernel_calls[0].position_ids is pos

    # the same documents one at a time, each loss divided by the packed batch's target count, summed
    model.zero_grad()
    alone_loss = torch.zeros((), device=DEVICE)
    for row in rows:
        for doc_ids, doc_labels in row:
            loss = model.loss(doc_ids[None].to(DEVICE), doc_labels[None].to(DEVICE), normalizer=n_targets)
            loss.backward()
            alone_loss += loss.detach()
    assert len(kernel_calls) == CFG.n_layers * 8 and all(d.position_ids is None for d in kernel_calls[CFG.n_layers :])
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # and the packed batch through the torch reference (per-document SDPA) gives the same numbers
    monkeypatch.setattr(c2a.model.llama, "causal_attention", c2a.kernels.causal_attention)
    ref_loss, ref_grads = loss_and_grads(model, ids, labels, position_ids=pos)
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("route", ["flash_attention", "attention_reference"])
def test_document_layout_built_once_per_forward(monkeypatch, route):
    """The kernel's document index and the reference's host-side spans are built once per model forward,
    not in every layer and not again when activation checkpointing recomputes the layers."""
    monkeypatch.setenv("C2A_KERNELS", "torch")
    attend = getattr(attention, route)
    calls = []

    def counting(q, k, v, documents):
        calls.append(documents)
        return attend(q, k, v, documents)

    monkeypatch.setattr(c2a.model.llama, "causal_attention", counting)
    builds = []
    for name in ("_document_index", "document_bounds"):
        build = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda pos, build=build, name=name: builds.append(name) or build(pos))
    model = Llama(LlamaConfig(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=101, multiple_of=32)).to(DEVICE)
    for block in model.layers:  # full activation checkpointing, as build_sharded_model applies it
        block.forward = _checkpointed(block.forward)
    ids, labels, pos = pack([make_documents([7, 19, 5])], T=36)
    model.loss(ids, labels, position_ids=pos).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(calls) == 6, len(calls)  # 3 layers forward, 3 recomputed in the backward
    assert builds == ["_document_index" if route == "flash_attention" else "document_bounds"], builds
