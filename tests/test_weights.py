"""Checkpoint import/export: Meta shards, HF safetensors, round trips, conversion CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file, save_file

from c2a.config import LlamaConfig
from c2a.model import CheckpointError, Llama, load_pretrained, save_pretrained
from c2a.model.convert import main as convert_main
from c2a.model.weights import save_hf

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=301, multiple_of=32)

# Meta's model-parallel split (fairscale ColumnParallelLinear / RowParallelLinear / ParallelEmbedding),
# written out here independently of c2a/model/weights.py.
SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
}


def split_dim(name: str) -> int | None:
    return SPLIT_DIM.get(name.split(".")[-2])


def save_meta_shards(model: Llama, out: Path, n: int) -> Path:
    """Writes `model` as Meta's consolidated.NN.pth shards with a Meta-style params.json (vocab_size -1)."""
    out.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in model.state_dict().items():
        dim = split_dim(name)
        parts = t.chunk(n, dim=dim) if dim is not None else [t] * n
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.randn(model.cfg.head_dim // 2)  # legacy buffer, must be ignored
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    cfg = model.cfg
    params = {
        "dim": cfg.dim,
        "multiple_of": cfg.multiple_of,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers,
        "norm_eps": cfg.norm_eps,
        "vocab_size": -1,
    }
    (out / "params.json").write_text(json.dumps(params))
    return out


@pytest.fixture
def model() -> Llama:
    m = Llama(CFG)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def assert_same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_shards_load_bitwise(model, tmp_path, n_shards):
    path = save_meta_shards(model, tmp_path / f"meta{n_shards}", n_shards)
    loaded = load_pretrained(path, dtype=torch.float32)
    assert loaded.cfg == CFG  # vocab_size -1 resolved from the embedding
    assert_same_weights(loaded, model)
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_meta_to_hf_to_c2a_bitwise_and_transformers_parity(model, tmp_path):
    meta = save_meta_shards(model, tmp_path / "meta", 2)
    assert convert_main([str(meta), str(tmp_path / "hf")]) == 0
    assert_same_weights(load_pretrained(tmp_path / "hf"), model)
    # params.json names no special tokens: Llama-2's BOS 1 / EOS 2, in config.json and as transformers reads it
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.generation_config.eos_token_id) == (1, 2, 2)
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_hf_to_c2a_to_hf_bitwise(tmp_path):
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "a")
    save_pretrained(load_pretrained(tmp_path / "a"), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@dataclasses.dataclass
class MetaModelArgs:
    """The fields of ModelArgs in Meta's Llama-2 code (llama/model.py), written out here. Meta's loader
    builds it as ModelArgs(max_seq_len=..., max_batch_size=..., **params): params.json may hold only these
    names, and neither of the two the loader passes itself."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: the loader sets it from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


def meta_ffn_width(args: MetaModelArgs) -> int:
    """Meta's FeedForward hidden width from ModelArgs (llama/model.py), written out here."""
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def test_hf_to_meta_and_back(model, tmp_path):
    save_pretrained(model, tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "meta")]) == 0
    assert (tmp_path / "meta" / "consolidated.00.safetensors").is_file()
    assert_same_weights(load_pretrained(tmp_path / "meta"), model)
    # Meta's own loader would build its model from this params.json (no TypeError), with these sizes
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    args = MetaModelArgs(max_seq_len=512, max_batch_size=1, **params)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.norm_eps) == (64, 2, 8, 2, CFG.norm_eps)
    # the HF config had no multiple_of: the one written must make Meta's formula give the FFN width
    assert args.vocab_size in (-1, CFG.vocab_size) and meta_ffn_width(args) == CFG.ffn_hidden_dim
    # and Meta's tensor names, each stored whole (one model-parallel shard)
    tensors = load_file(tmp_path / "meta" / "consolidated.00.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_sharded_hf_export_loads_in_transformers(model, tmp_path):
    save_pretrained(model, tmp_path / "hf", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_weights(load_pretrained(tmp_path / "hf"), model)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, CFG.vocab_size, (1, 23))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_hf_export_writes_each_shard_when_full(model, tmp_path):
    """save_hf streams: while tensors are still being produced, the full shards are already on disk (a 13B
    export through rank 0 must not hold the whole model)."""
    out = tmp_path / "hf"
    on_disk = []

    def tensors():
        for name, p in model.named_parameters():
            on_disk.append(len(list(out.glob("*.partial"))))
            yield name, p

    save_hf(model.cfg, tensors(), out, max_shard_bytes=60_000)
    shards = len(list(out.glob("model-*-of-*.safetensors")))
    # before the last tensor came, every shard but the one it closes and the one it opens was on disk
    assert shards > 2 and on_disk[-1] >= shards - 2, (on_disk, shards)
    assert not list(out.glob("*.partial"))
    assert_same_weights(load_pretrained(out), model)


def test_load_pretrained_dtype(model, tmp_path):
    save_pretrained(model, tmp_path / "hf")
    bf16 = load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.output.weight, model.output.weight.to(torch.bfloat16))


def test_convert_cli_subprocess(model, tmp_path):
    meta = save_meta_shards(model, tmp_path / "meta", 2)
    run = subprocess.run(
        [sys.executable, "-m", "c2a.model.convert", str(meta), str(tmp_path / "hf"), "--dtype", "bf16"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    assert_same_weights(load_pretrained(tmp_path / "hf"), model.to(torch.bfloat16))  # rounded, not otherwise changed
    again = subprocess.run(
        [sys.executable, "-m", "c2a.model.convert", str(meta), str(tmp_path / "hf")], capture_output=True, text=True
    )
    assert again.returncode == 1 and "not empty" in again.stderr  # never overwrites what is there


# ------------------------------------------------------------------------------------------- bad input


def test_error_neither_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither an HF checkpoint .* nor a Meta checkpoint"):
        load_pretrained(tmp_path)


def test_error_missing_meta_shard(model, tmp_path):
    path = save_meta_shards(model, tmp_path / "meta", 4)
    (path / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match="missing shard consolidated.02.pth"):
        load_pretrained(path)


def test_error_params_contradict_weights(model, tmp_path):
    path = save_meta_shards(model, tmp_path / "meta", 2)
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(
        CheckpointError,
        match=r"consolidated.00.pth .*'layers.0.attention.wk.weight' has shape \(16, 64\), but .*params.json implies \(32, 64\)",
    ):
        load_pretrained(path)


def test_error_unexpected_and_missing_tensor(model, tmp_path):
    save_pretrained(model, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    extra = {**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    save_file(extra, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"
    ):
        load_pretrained(tmp_path / "hf")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.feed_forward.w2.weight'\]"):
        load_pretrained(tmp_path / "hf")


def test_error_hf_index_names_missing_file(model, tmp_path):
    save_pretrained(model, tmp_path / "hf", max_shard_bytes=60_000)
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}"):
        load_pretrained(tmp_path / "hf")


def test_error_meta_shard_with_pickled_object(model, tmp_path):
    path = save_meta_shards(model, tmp_path / "meta", 1)
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "evil": Path("/")}, path / "consolidated.00.pth")  # not a tensor: never unpickled
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot be read as a checkpoint shard"):
        load_pretrained(path)


def test_error_unsupported_hf_variant(model, tmp_path):
    save_pretrained(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: unsupported rope scaling type 'yarn'"):
        load_pretrained(tmp_path / "hf")


def test_real_llama2_tokenizer_loads(real_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    assert (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (32000, 1, 2, -1)
    assert sp.decode(sp.encode("### Response:\nHello, world!")) == "### Response:\nHello, world!"


def test_convert_keeps_every_tokenizer_file_and_the_chat_template(model, tmp_path):
    """One copier of tokenizer files (c2a.data.tokenizer.export_tokenizer) for the trainer's export and the
    converter: a run's final/ converted keeps the chat template it trained with, and the tokenizer's files."""
    from c2a.data.demo import DEMO_TOKENIZER

    src = save_pretrained(model, tmp_path / "final")
    (src / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    assert convert_main([str(src), str(tmp_path / "meta")]) == 0
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf")]) == 0
    for out in (tmp_path / "meta", tmp_path / "hf"):
        assert (out / "chat_template.jinja").read_text() == template
        assert (out / "tokenizer.model").read_bytes() == DEMO_TOKENIZER.read_bytes()
        assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
