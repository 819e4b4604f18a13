"""LoRA (c2a.model.lora, c2a.model.adapter, [lora] config) against PEFT on a transformers Llama.

Oracle: peft (the `lora` extra) wrapping transformers' LlamaForCausalLM with the same A and B: logits and the
gradients of every A and B equal within fp32 tolerance, for several target sets, rslora and dropout in eval.
Without peft installed these skip in the main run; .ci/run installs the extra and demands they run.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from c2a.config import LlamaConfig, build_config
from c2a.model import load_pretrained
from c2a.model.adapter import (
    AdapterError,
    AdapterSpec,
    merge_adapter,
    read_adapter,
    read_adapter_spec,
    save_adapter,
    to_peft,
)
from c2a.model.lora import LoRALinear, apply_lora, lora_layers, merge_lora
from c2a.model.qlora import QLoRALinear
from c2a.model.weights import hf_name, to_hf_rotary

try:
    import peft
except ImportError:  # the `lora` extra; .ci/run installs it and demands that nothing here skips
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="pip install -e '.[lora]' (PEFT is LoRA's oracle)")

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=211, ffn_hidden_dim=96)


def hf_llama(cfg: LlamaConfig, tied: bool = False) -> transformers.LlamaForCausalLM:
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.05) + (1.0 if "norm" in name else 0.0))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    hf_llama(CFG).save_pretrained(path)
    return path


def randomise_adapters(model) -> None:
    """B starts at 0 (PEFT's init too), which would hide a wrong B: give A and B random values."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_(0, 0.1)
            layer.lora_B.normal_(0, 0.1)


def peft_pair(base_dir, spec: AdapterSpec, targets: list[str]):
    """c2a's LoRA model and PEFT's on the same base, with the same (random) A and B."""
    ours = apply_lora(load_pretrained(base_dir, dtype=torch.float32), spec.targets, spec.rank, spec.alpha,
                      spec.dropout, spec.rslora)  # fmt: skip
    randomise_adapters(ours)
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    lora_cfg = peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, use_rslora=spec.rslora
    )
    theirs = peft.get_peft_model(hf, lora_cfg)
    state = dict(to_peft(n, p.detach(), CFG) for n, p in ours.named_parameters() if "lora_" in n)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return ours, theirs


VARIANTS = {
    # (targets as the user writes them, c2a's names, rank, alpha, dropout, rslora)
    "all-linear": ("all-linear", ("w1", "w2", "w3", "wk", "wo", "wq", "wv"), 4, 8.0, 0.0, False),
    "qv": (["q_proj", "v_proj"], ("wq", "wv"), 8, 16.0, 0.0, False),
    "k-o-gate-rslora": (["k_proj", "o_proj", "gate_proj"], ("w1", "wk", "wo"), 4, 6.0, 0.0, True),
    "dropout-eval": (["q_proj", "k_proj", "down_proj", "up_proj"], ("w2", "w3", "wk", "wq"), 2, 3.0, 0.3, False),
}


@needs_peft
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_matches_peft(base_dir, variant):
    targets, meta, rank, alpha, dropout, rslora = VARIANTS[variant]
    spec = AdapterSpec(rank, alpha, dropout, meta, rslora)
    ours, theirs = peft_pair(base_dir, spec, targets)
    ours.eval(), theirs.eval()  # dropout off in both
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    probe = torch.randn(2, 23, CFG.vocab_size)
    logits = ours(ids)
    ref = theirs(input_ids=ids).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    (logits * probe).sum().backward()
    (ref * probe).sum().backward()
    theirs_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    lora_names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(lora_names) == len(theirs_grads) == 2 * CFG.n_layers * len(meta)
    for name in lora_names:
        key, grad = to_peft(name, dict(ours.named_parameters())[name].grad, CFG)
        # fp32 sums in another order: ~1e-6 of the gradient's norm apart (a wrong row order would be ~1)
        assert rel_err(grad, theirs_grads[key]) < 1e-5, name
    # the base gets no gradient at all: frozen weights, embedding, norms and head
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_init_scale_and_config_names():
    """PEFT's init (A kaiming-uniform with bound 1/sqrt(in), B zero) and scale; the [lora] section's names."""
    w = torch.nn.Parameter(torch.randn(96, 4000))
    layer = LoRALinear(w, rank=16, scale=2.0)
    bound = 1 / 4000**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)  # uniform's std
    assert torch.count_nonzero(layer.lora_B) == 0 and not layer.weight.requires_grad
    cfg = build_config({"lora": {"rank": 16, "targets": "q_proj,wk,up_proj"}})
    assert cfg.lora.target_modules() == ("w3", "wk", "wq") and cfg.lora.lora_alpha == 32 and cfg.lora.scale == 2
    rs = build_config({}, {"lora.rank": "16", "lora.alpha": "8", "lora.rslora": "true"})
    assert rs.lora.scale == 2.0  # 8 / sqrt(16)
    assert build_config({}).lora.enabled is False  # the default: full fine-tuning
    assert build_config({}, {"lora.rank": "8", "train.cpu_offload": "true"}).train.cpu_offload  # accepted


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora.rank": "-1"}, "lora.rank must be >= 0"),
        ({"lora.rank": "8", "lora.targets": "q_proj,lm_head"}, "unknown target 'lm_head'"),
        ({"lora.rank": "8", "train.compile": "true"}, "lora with train.compile is not supported"),
        ({"lora.dropout": "1"}, r"lora.dropout must be in \[0, 1\)"),
        ({"lora.rank": "8", "train.fp8": "true"}, "lora with train.fp8 = true is not supported yet"),
        ({"lora.rank": "8", "train.gather_once": "true"}, "lora with train.gather_once = true is not"),
        ({"lora.rank": "8", "train.reduce_once": "true"}, "lora with train.reduce_once = true is not"),
        ({"lora.rank": "8", "train.master_dtype": "bf16"}, "lora with train.master_dtype = bf16"),
        ({"lora.rank": "8", "model.add_pad_token": "true"}, "lora with model.add_pad_token = true"),
        (
            {"lora.rank": "8", "train.early_stop_patience": "2", "eval.every": "5", "data.val_fraction": "0.1"},
            "lora with train.early_stop_patience is not supported yet",
        ),
        ({"lora.quantize": "nf4"}, "lora.quantize = nf4 freezes a 4-bit base around adapters: it needs lora.rank > 0"),
        ({"lora.rank": "8", "lora.quantize": "int4"}, "lora.quantize must be none or nf4, got 'int4'"),
        ({"lora.rank": "8", "lora.quantize": "nf4", "train.fp8": "true"}, "lora with train.fp8 = true is not"),
        ({"lora.rank": "8", "lora.quantize": "nf4", "train.compile": "true"}, "lora with train.compile is not"),
        ({"lora.rank": "8", "lora.quantize": "nf4", "train.gather_once": "true"}, "lora with train.gather_once"),
        (
            {"lora.rank": "8", "lora.quantize": "nf4", "train.cpu_offload": "true"},
            "lora.quantize = nf4 with train.cpu_offload = true is not supported yet",
        ),
        (
            {"lora.rank": "8", "lora.quantize": "nf4", "train.replicas": "2"},
            r"lora.quantize = nf4 with train.replicas > 1 \(HSDP\) is not supported yet",
        ),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        build_config({}, overrides)
    assert "\n" not in str(e.value)  # one line


def test_frozen_linear_has_no_weight_gradient_gemm():
    """Forward + backward FLOPs of a LoRA linear: the base's forward and dX GEMMs (2 x 2·N·in·out), never its
    dW GEMM; the adapter's 6·N·r·(in + out) (forward 2, backward 4)."""
    N, d_in, d_out, r = 32, 64, 96, 4
    layer = LoRALinear(torch.nn.Parameter(torch.randn(d_out, d_in)), rank=r, scale=1.0)
    x = torch.randn(N, d_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 4 * N * d_in * d_out + 6 * N * r * (d_in + d_out)
    assert layer.weight.grad is None and layer.lora_A.grad is not None


def test_qlora_layer_saves_codes_not_the_weight_and_trains_as_lora_on_its_dequantized_base():
    """QLoRALinear: output and every gradient equal a LoRALinear's around the dequantized base; between forward
    and backward it keeps the uint8 codes, no [out, in] weight in a float dtype; the base gets no gradient."""
    torch.manual_seed(0)
    d_in, d_out, r = 128, 192, 4
    q = QLoRALinear(torch.randn(d_out, d_in), rank=r, scale=2.0, hf_rotary_heads=4)
    torch.nn.init.normal_(q.lora_B)
    ref = LoRALinear(torch.nn.Parameter(q.base_weight(torch.float32)), rank=r, scale=2.0)
    ref.lora_A.data.copy_(q.lora_A)
    ref.lora_B.data.copy_(q.lora_B)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= d_in * d_out], [t.shape for t in saved]
    assert any(t.dtype == torch.uint8 and t.numel() == d_in * d_out // 2 for t in saved)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, q.lora_A, q.lora_B), g)
    x2 = x.detach().requires_grad_(True)
    y2 = ref(x2)
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, torch.autograd.grad(y2, (x2, ref.lora_A, ref.lora_B), g)):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in q.base.parameters())


def test_tied_embedding_stays_frozen_and_tied(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    hf_llama(cfg, tied=True).save_pretrained(tmp_path)
    model = apply_lora(load_pretrained(tmp_path, dtype=torch.float32), ("wq", "wv"), 4, 8.0)
    assert model.output.weight is model.tok_embeddings.weight and not model.output.weight.requires_grad
    model.loss(torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 9))).backward()
    assert model.tok_embeddings.weight.grad is None


@needs_peft
def test_adapter_round_trip_and_merge_match_peft(base_dir, tmp_path):
    """c2a's adapter files load in PEFT with c2a's logits; c2a's merge equals PEFT's merge_and_unload; PEFT's
    own saved adapter reads back into c2a (merge_adapter) with the same weights."""
    spec = AdapterSpec(4, 8.0, 0.0, ("w2", "wk", "wq", "wv"), rslora=True)
    ours, _ = peft_pair(base_dir, spec, ["q_proj", "k_proj", "v_proj", "down_proj"])
    ours.eval()
    save_adapter(spec, CFG, ours.named_parameters(), tmp_path / "adapter", str(base_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-5)
        merged_ref = loaded.merge_and_unload().state_dict()
        merged = merge_lora(ours)
    assert not lora_layers(merged)
    # PEFT's merge in HF names and layout == c2a's merge exported the HF way
    for name, p in merged.named_parameters():
        heads = {"wq": CFG.n_heads, "wk": CFG.n_kv_heads}.get(name.split(".")[-2])
        value = to_hf_rotary(p, heads) if heads and name.endswith(".weight") and "attention" in name else p
        torch.testing.assert_close(value, merged_ref[hf_name(name)], rtol=1e-5, atol=1e-6, msg=name)
    # merge_adapter on a plain base reads the files back to the same weights
    again = merge_adapter(load_pretrained(base_dir, dtype=torch.float32), tmp_path / "adapter")
    for (n, a), b in zip(again.named_parameters(), merged.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def write_adapter_config(path, **changes):
    path.mkdir(parents=True, exist_ok=True)
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(raw | changes))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora=True: not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=\\['lm_head'\\]: not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern="),
        ({"bias": "all"}, "bias='all': not supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules \\['lm_head'\\] are not Llama linears"),
    ],
)
def test_adapter_refusals(tmp_path, changes, message):
    with pytest.raises(AdapterError, match=message):
        read_adapter_spec(write_adapter_config(tmp_path / "a", **changes))


def test_adapter_for_another_base_is_refused(base_dir, tmp_path):
    spec = AdapterSpec(4, 8.0, 0.0, ("wq", "wv"))
    model = apply_lora(load_pretrained(base_dir, dtype=torch.float32), spec.targets, 4, 8.0)
    save_adapter(spec, CFG, model.named_parameters(), tmp_path / "a", "base")
    other = CFG.replace(dim=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(
        AdapterError,
        match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 64\), "
        r"but the base model \(dim 32, ffn 96\) needs \(4, 32\)",
    ):
        read_adapter(tmp_path / "a", other)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path / "nothing", CFG)


@needs_peft
def test_generate_with_adapter_equals_merged_model(tmp_path, capsys):
    """A PEFT-saved adapter: `c2a.generate --adapter` answers as the model `convert --merge-adapter` writes, and
    that model's weights are PEFT's merge_and_unload; an adapter for another base is one line naming key and
    both shapes."""
    from c2a.data.demo import DEMO_TOKENIZER
    from c2a.generate import main as generate
    from c2a.model.convert import main as convert

    base = tmp_path / "base"
    hf_llama(CFG.replace(vocab_size=520)).save_pretrained(base)
    (base / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    peft_model = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_ref = peft_model.merge_and_unload().state_dict()
    assert convert([str(base), str(tmp_path / "merged"), "--merge-adapter", str(tmp_path / "adapter")]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in merged.items():
        torch.testing.assert_close(value, merged_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    answers = []
    for args in (["--model", str(base), "--adapter", str(tmp_path / "adapter")], ["--model", str(tmp_path / "merged")]):
        capsys.readouterr()
        assert generate([*args, "--prompt", "reverse: a b c", "--max-new-tokens", "12"]) == 0
        answers.append(capsys.readouterr().out)
    capsys.readouterr()
    assert generate(["--model", str(base), "--prompt", "reverse: a b c", "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr().out
    assert answers[0] == answers[1] and answers[0] != plain  # the adapter changes the answer
    other = tmp_path / "other"
    hf_llama(CFG.replace(vocab_size=520, ffn_hidden_dim=80)).save_pretrained(other)
    (other / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    capsys.readouterr()
    assert generate(["--model", str(other), "--adapter", str(tmp_path / "adapter"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mlp.down_proj.lora_A.weight has shape (4, 96)" in err and "(4, 80)" in err, err


def test_lora_recipe_keeps_the_cards_data_and_batch():
    from pathlib import Path

    import tomllib

    configs = Path(__file__).resolve().parents[1] / "configs"
    card = build_config(tomllib.loads((configs / "claude2-alpaca-7b.toml").read_text()))
    lora = build_config(tomllib.loads((configs / "claude2-alpaca-7b-lora.toml").read_text()))
    assert lora.data == card.data and lora.eval == card.eval
    keep = ("epochs", "global_batch", "warmup_ratio", "min_lr_ratio", "weight_decay", "beta2", "grad_clip", "dtype")
    assert all(getattr(lora.train, k) == getattr(card.train, k) for k in keep)
    assert (lora.lora.rank, lora.lora.lora_alpha, lora.lora.target_modules(), lora.train.lr) == (
        16, 32.0, ("w1", "w2", "w3", "wk", "wo", "wq", "wv"), 2e-4,
    )  # fmt: skip
    assert not card.lora.enabled  # the card's recipes stay full fine-tunes


def test_init_adapter_settings_win_and_contradictions_are_refused(tmp_path):
    from c2a.train.errors import TrainingError
    from c2a.train.lora_run import lora_spec

    adapter = write_adapter_config(tmp_path / "a", use_rslora=True)  # r 4, alpha 8, q_proj and v_proj
    spec = lora_spec(build_config({}, {"lora.init_adapter": str(adapter), "lora.dropout": "0.1"}).lora)
    assert (spec.rank, spec.alpha, spec.targets, spec.rslora, spec.dropout) == (4, 8.0, ("wq", "wv"), True, 0.1)
    clash = build_config({}, {"lora.init_adapter": str(adapter), "lora.rank": "8", "lora.targets": "all-linear,wq"})
    with pytest.raises(
        TrainingError,
        match=r"lora.rank = 8 but the adapter has 4; lora.targets = .* but the adapter has \('wq', 'wv'\)",
    ):
        lora_spec(clash.lora)


def test_trainer_refuses_a_missing_init_adapter_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "c2a.train", f"--out_dir={tmp_path / 'run'}", f"--lora.init_adapter={tmp_path / 'none'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"[c2a] error: {tmp_path / 'none'}: no adapter_config.json (not a PEFT adapter directory)"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_lora_on_both_kernel_paths(base_dir, kernels, monkeypatch):
    """The adapters' gradients under the torch reference ops and the Triton kernels (interpreted on CPU) agree
    with a float64 run of the torch path, and the frozen base gets none on either."""
    ids = torch.randint(0, CFG.vocab_size, (2, 19))
    labels = torch.randint(0, CFG.vocab_size, (2, 19))

    def grads(dtype):
        torch.manual_seed(3)
        model = apply_lora(load_pretrained(base_dir, dtype=dtype), ("wq", "wk", "w2"), 4, 8.0)
        randomise_adapters(model)
        model.loss(ids, labels).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setenv("C2A_KERNELS", "torch")
    ref = grads(torch.float64)
    monkeypatch.setenv("C2A_KERNELS", kernels)
    got = grads(torch.float32)
    assert got.keys() == ref.keys() and all("lora_" in n for n in got)
    for name in got:
        assert rel_err(got[name], ref[name]) < 1e-4, name
