"""The Llama-2 model on the torch path: HF logit parity, packed documents, the chunked loss, presets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from c2a.config import PRESETS, LlamaConfig
from c2a.model import Llama, load_pretrained


def hf_llama(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A randomly initialised HF LlamaForCausalLM of the same shape, norm weights randomised too."""
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # randomise everything, norms included, so a transposed or misnamed weight cannot hide
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.05) + (1.0 if "norm" in name else 0.0))
    return model


PARITY_CONFIGS = {
    "mha-hd16": LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1001, ffn_hidden_dim=172, norm_eps=1e-6),
    "gqa-hd32": LlamaConfig(
        dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=997, multiple_of=32, rope_theta=500000.0
    ),
    "mqa-hd16": LlamaConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=1, vocab_size=515, ffn_hidden_dim=250),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def hf_pair(request, tmp_path):
    """(c2a model loaded from an HF checkpoint on disk, the HF model, config)."""
    cfg = PARITY_CONFIGS[request.param]
    hf = hf_llama(cfg)
    hf.save_pretrained(tmp_path)
    return load_pretrained(tmp_path, dtype=torch.float32), hf, cfg


@pytest.mark.parametrize("T", [1, 2, 37, 100])
def test_logits_match_hf_fp32(hf_pair, T):
    model, hf, cfg = hf_pair
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        ours = model(ids)
        ref = hf(ids).logits
    assert ours.shape == (2, T, cfg.vocab_size)
    assert rel_err(ours, ref) < 1e-5


def test_logits_match_hf_bf16(hf_pair):
    """In bf16, c2a may not stray from HF's fp32 logits by more than twice what HF's own bf16 run does."""
    model, hf, cfg = hf_pair
    ids = torch.randint(0, cfg.vocab_size, (2, 53))
    with torch.no_grad():
        ref = hf(ids).logits
        hf_err = rel_err(hf.to(torch.bfloat16)(ids).logits, ref)
        our_err = rel_err(model.to(torch.bfloat16)(ids), ref)
    assert our_err < 2 * hf_err + 1e-3, (our_err, hf_err)
    assert our_err < 3e-2


def test_packed_rows_equal_documents_run_alone():
    cfg = PARITY_CONFIGS["gqa-hd32"]
    model = Llama(cfg).eval()
    lengths = [[5, 1, 30, 12], [48]]  # per row; each row 48 tokens
    docs = [[torch.randint(0, cfg.vocab_size, (n,)) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    with torch.no_grad():
        packed = model(ids, position_ids=pos)
        for b, row in enumerate(docs):
            start = 0
            for d in row:
                alone = model(d[None])[0]
                torch.testing.assert_close(packed[b, start : start + len(d)], alone, rtol=1e-5, atol=1e-5)
                start += len(d)
    # and the documents do interact when position_ids does not separate them
    with torch.no_grad():
        unpacked = model(ids)
    assert not torch.allclose(unpacked[0, 6:], packed[0, 6:], atol=1e-3)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_equals_cross_entropy_on_full_logits():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1001, multiple_of=32)
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 29))
    labels = torch.randint(0, cfg.vocab_size, (3, 29))
    labels[0, :10] = -100
    labels[2] = -100
    pos = torch.cat([torch.arange(13), torch.arange(16)]).expand(3, 29)

    ref = F.cross_entropy(model(ids, pos).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    loss = model.loss(ids, labels, position_ids=pos)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_normalizer_and_all_ignored():
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16)
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    n = int((labels != -100).sum())
    mean = model.loss(ids, labels)
    summed = model.loss(ids, labels, normalizer=1.0)
    torch.testing.assert_close(summed, mean * n)
    torch.testing.assert_close(model.loss(ids, labels, normalizer=torch.tensor(4.0 * n)), mean / 4)

    ignored = torch.full_like(labels, -100)
    loss = model.loss(ids, ignored)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())


def test_loss_rejects_misshapen_labels():
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=100, multiple_of=16))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model.loss(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_presets_match_meta():
    assert {n: PRESETS[n].ffn_hidden_dim for n in ("llama2-7b", "llama2-13b", "llama2-70b")} == {
        "llama2-7b": 11008,
        "llama2-13b": 13824,
        "llama2-70b": 28672,
    }
    assert LlamaConfig.from_name("llama2-70b").n_kv_heads == 8
    # Meta's published parameter counts: 6.74B, 13.0B, 69.0B
    assert round(LlamaConfig.from_name("llama2-7b").num_params / 1e9, 2) == 6.74
    assert round(LlamaConfig.from_name("llama2-13b").num_params / 1e9, 1) == 13.0
    assert round(LlamaConfig.from_name("llama2-70b").num_params / 1e9, 1) == 69.0
    with pytest.raises(KeyError, match="valid presets: demo, llama2-13b, llama2-70b, llama2-7b"):
        LlamaConfig.from_name("llama2-7B")


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        LlamaConfig(dim=65, n_heads=4)


def test_meta_device_build_then_init_weights():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, multiple_of=16)
    with torch.device("meta"):
        model = Llama(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all((p == 1).all() for p in norms)
    wq = model.layers[0].attention.wq.weight
    wo = model.layers[0].attention.wo.weight
    assert 0.015 < wq.std().item() < 0.025  # std 0.02
    assert 0.007 < wo.std().item() < 0.013  # residual outputs scaled by 1/sqrt(2 * n_layers) = 1/2
    loss = model.loss(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.1  # near-uniform at init


@pytest.mark.parametrize("builtin", [True, False], ids=["torch-builtin", "fallback-without-F.linear_cross_entropy"])
def test_chunked_loss_matches_reference_across_chunks(monkeypatch, builtin):
    """The torch path's chunked loss over several chunks (vocab large enough that a chunk is 239 rows), with
    torch's built-in and, as on torch < 2.13, without it."""
    from c2a.kernels import cross_entropy as ce

    if not builtin:
        monkeypatch.delattr(F, "linear_cross_entropy")
    h = torch.randn(600, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(70000, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 70000, (600,))
    labels[::3] = -100
    assert ce.chunk_rows(600, 70000) == 239
    loss = ce.linear_cross_entropy_chunked(h, w, labels)
    grads = torch.autograd.grad(loss, (h, w))
    ref = ce.linear_cross_entropy_reference(h, w, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-9)
    empty = ce.linear_cross_entropy_chunked(h[:0], w, labels[:0])  # no rows at all: a defined 0
    assert empty.item() == 0.0 and torch.autograd.grad(empty, h)[0].abs().sum() == 0


def test_torch_path_without_triton_installed():
    """Triton ships for Linux only: elsewhere the model must import and train on the torch path, and asking
    for the Triton kernels must say why it cannot."""
    code = """
import os, sys
sys.modules["triton"] = None  # as on a machine without Triton: any import of it fails
sys.modules["triton.language"] = None
import torch
from c2a.config import LlamaConfig
from c2a.model import Llama
model = Llama(LlamaConfig.from_name("demo"))
ids = torch.randint(0, 512, (2, 9))
loss = model.loss(ids, ids, torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * 2))
loss.backward()
assert torch.isfinite(loss) and model.output.weight.grad is not None
os.environ["C2A_KERNELS"] = "triton"
try:
    model.loss(ids, ids)
except RuntimeError as e:
    assert "Triton is not installed" in str(e), e
else:
    raise AssertionError("C2A_KERNELS=triton without Triton did not fail")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("C2A_KERNELS", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
