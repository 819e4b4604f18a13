"""The wider Llama family: tied embeddings, Llama-3.1 rope scaling, tokenizer.json tokenizers, chat data.

Oracles: HF transformers' LlamaForCausalLM built here with tie_word_embeddings=True, GQA and rope_type
"llama3" (logits, greedy generation, its rope frequencies); tokenizers trained here with the `tokenizers`
library; transformers' apply_chat_template for chat rendering.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from c2a.config import LlamaConfig
from c2a.model import Llama, load_pretrained, save_pretrained
from c2a.model.generate import generate
from c2a.model.weights import CheckpointError

# Original context 64 tokens with theta 10000 and Hd 16: the 8 pair wavelengths 2π·10000^(i/8) are
# 6.3, 20, 63, 199, ... tokens, so pair 0 is high-frequency (kept, < 64/4), pairs 1-2 are blended and
# pairs 3-7 are low-frequency (divided by the factor): all three branches of the llama3 rule are exercised.
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def family_hf(vocab: int = 263, seed: int = 0, std: float = 0.05, rope: dict | None = ROPE) -> transformers.LlamaForCausalLM:
    """A random tied-embedding GQA HF Llama with llama3 rope scaling, norms randomised too."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else std) + (1.0 if "norm" in name else 0.0))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("family")
    hf = family_hf()
    hf.save_pretrained(path)
    return path, hf


# ------------------------------------------------------------------------------------- model and weights


def test_hf_family_checkpoint_loads_tied_and_scaled(family_dir):
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    assert model.cfg.tie_word_embeddings and model.cfg.use_scaled_rope
    assert (model.cfg.rope_scaling_factor, model.cfg.low_freq_factor, model.cfg.high_freq_factor, model.cfg.original_max_seq_len) == (8.0, 1.0, 4.0, 64)
    assert model.output.weight is model.tok_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names and len(names) == 1 + 2 * 9 + 1
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("T", [1, 37, 200])
def test_logits_match_hf_tied_llama3(family_dir, T):
    """T 200 > the original context 64, where the scaled frequencies matter most."""
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 263, (2, T))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert rel_err(ours, ref) < 1e-5


def test_logits_differ_without_scaling(family_dir):
    """The parity above is not vacuous: the same weights with plain rope give other logits past a few tokens."""
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    plain = Llama(model.cfg.replace(use_scaled_rope=False))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 263, (1, 100))
    with torch.no_grad():
        assert rel_err(plain(ids), hf(ids).logits) > 1e-3


def test_rope_frequencies_match_hf(family_dir):
    from c2a.kernels.rotary import rotary_inv_freq
    from c2a.model.llama import rope_scaling

    path, hf = family_dir
    cfg = load_pretrained(path, dtype=torch.float32).cfg
    hf_inv_freq = hf.model.rotary_emb.inv_freq
    ours = rotary_inv_freq(cfg.head_dim, cfg.rope_theta, torch.device("cpu"), rope_scaling(cfg))
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=1e-6, atol=0)


def test_greedy_generation_matches_hf(tmp_path):
    torch.set_num_threads(1)
    hf = family_hf(std=0.3)  # confident, varied next tokens: long greedy paths with ties far apart
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.float32).eval()
    for seed, length in ((0, 3), (1, 70)):
        g = torch.Generator().manual_seed(seed)
        prompt = [1] + torch.randint(3, 263, (length - 1,), generator=g).tolist()
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones(1, length, dtype=torch.long))[0, length:].tolist()  # fmt: skip
        assert generate(model, prompt, max_new_tokens=40, stop_ids=()) == ref


def test_tied_gradient_is_embedding_plus_head():
    """One parameter, two uses: its gradient is the embedding's plus the head's (an untied twin's sum)."""
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=51, ffn_hidden_dim=48, tie_word_embeddings=True)
    tied = Llama(cfg)
    untied = Llama(cfg.replace(tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in untied.named_parameters():
            p.copy_(tied.tok_embeddings.weight if name == "output.weight" else tied.get_parameter(name))
    ids, labels = torch.randint(0, 51, (2, 9)), torch.randint(0, 51, (2, 9))
    labels[0, :4] = -100
    tied.loss(ids, labels).backward()
    untied.loss(ids, labels).backward()
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, untied.tok_embeddings.weight.grad + untied.output.weight.grad)
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


def test_tied_save_exports_one_matrix(family_dir, tmp_path):
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_type"] == "llama3"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and len(keys) == 20
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, 263, (1, 90))
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < 1e-5


def test_unsupported_rope_type_named(family_dir, tmp_path):
    path, _ = family_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: unsupported rope scaling type 'yarn'"):
        load_pretrained(tmp_path)
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="llama3 rope scaling without low_freq_factor, high_freq_factor, original_max_position_embeddings"):
        load_pretrained(tmp_path)
