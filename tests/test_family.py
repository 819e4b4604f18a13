"""The wider Llama family: tied embeddings, Llama-3.1 rope scaling, tokenizer.json tokenizers, chat data.

Oracles: HF transformers' LlamaForCausalLM built here with tie_word_embeddings=True, GQA and rope_type
"llama3" (logits, greedy generation, its rope frequencies); tokenizers trained here with the `tokenizers`
library; transformers' apply_chat_template for chat rendering.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from train_runs import loss_on_rows, metrics, run_train, step_rows, trainer_state

from c2a.config import LlamaConfig
from c2a.data import TokenizedDataset, Tokenizer, encode_example, format_prompt
from c2a.data.chat import ALPACA_TEMPLATE
from c2a.data.demo import demo_split
from c2a.model import Llama, load_pretrained, save_pretrained
from c2a.model.generate import generate
from c2a.model.weights import CheckpointError

# Original context 64 tokens with theta 10000 and Hd 16: the 8 pair wavelengths 2π·10000^(i/8) are
# 6.3, 20, 63, 199, ... tokens, so pair 0 is high-frequency (kept, < 64/4), pairs 1-2 are blended and
# pairs 3-7 are low-frequency (divided by the factor): all three branches of the llama3 rule are exercised.
ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def family_hf(
    vocab: int = 263, seed: int = 0, std: float = 0.05, rope: dict | None = ROPE, bos: int = 1, eos: int | list[int] = 2
) -> transformers.LlamaForCausalLM:
    """A random tied-embedding GQA HF Llama with llama3 rope scaling, norms randomised too."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})},
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=0,
        attn_implementation="eager",
    )
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
    assert (
        model.cfg.rope_scaling_factor,
        model.cfg.low_freq_factor,
        model.cfg.high_freq_factor,
        model.cfg.original_max_seq_len,
    ) == (8.0, 1.0, 4.0, 64)
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
    # one intra-op thread: decoding is thousands of tiny ops (see tests/test_generate.py's _one_thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _greedy_matches_hf(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _greedy_matches_hf(tmp_path) -> None:
    hf = family_hf(std=0.3)  # confident, varied next tokens: long greedy paths with ties far apart
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.float32).eval()
    for seed, length in ((0, 3), (1, 70)):
        g = torch.Generator().manual_seed(seed)
        prompt = [1] + torch.randint(3, 263, (length - 1,), generator=g).tolist()
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, length, dtype=torch.long),
        )[0, length:].tolist()
        assert len(set(ref)) > 5  # a varied path, not one token repeated
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
    torch.testing.assert_close(
        tied.tok_embeddings.weight.grad, untied.tok_embeddings.weight.grad + untied.output.weight.grad
    )
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


def test_tied_save_exports_one_matrix(family_dir, tmp_path):
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_type"] == "llama3"
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
    with pytest.raises(
        CheckpointError,
        match="llama3 rope scaling without low_freq_factor, high_freq_factor, original_max_position_embeddings",
    ):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ tokenizer.json

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A Llama-3-style chat template (header tokens, a turn ends with <|eot_id|>), written for these tests.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def corpus(n: int = 200) -> list[str]:
    records = demo_split(n, 4, seed=3)[0]
    return [format_prompt(r["instruction"], r["input"]) + r["output"] for r in records] + [
        "héllo wörld ✓ 日本語 — ünïcode"
    ]


def byte_level_tokenizer(directory: Path, vocab: int = 420) -> Path:
    """A Llama-3-style byte-level BPE tokenizer.json trained here, its BOS/EOS in tokenizer_config.json, and a
    post-processor that adds BOS (as Llama-3's does: c2a must not let it add a second one)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=LLAMA3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    )
    return directory / "tokenizer.json"


def metaspace_tokenizer(directory: Path) -> Path:
    """A SentencePiece-converted-style tokenizer.json (TinyLlama's kind): a Prepend("▁") normalizer, byte
    fallback, a decoder that strips the first space; BOS/EOS in special_tokens_map.json as AddedToken objects."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, trainers

    tok = HFTok(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}})
    )
    return directory / "tokenizer.json"


TEXTS = [
    "Red, green and blue.",
    " a leading space",
    "\nnewline first",
    "héllo ✓ 日本語",
    "x<|eot_id|>y </s> <s>",
    "tabs\tand  two  spaces ",
    "9",
]


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_tokenizer_json_exact_prompt_response_decode(kind, tmp_path):
    path = (byte_level_tokenizer if kind == "byte-level" else metaspace_tokenizer)(tmp_path / kind)
    tok = Tokenizer(tmp_path / kind)  # a directory: its tokenizer.json
    assert tok.path == path and type(tok).__name__ == "HFTokenizer"
    bos, eos = ("<|begin_of_text|>", "<|eot_id|>") if kind == "byte-level" else ("<s>", "</s>")
    assert (tok.piece(tok.bos_id), tok.piece(tok.eos_id)) == (bos, eos)
    for instruction, response in zip(TEXTS, reversed(TEXTS)):
        prompt = format_prompt(instruction)
        ids = tok.encode(prompt) + tok.encode_continuation(response, eos=True)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the post-processor's BOS is not added again
        assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1  # "<|eot_id|>" / "</s>" typed in text stays text
        assert tok.decode(ids) == prompt + response
        input_ids, labels = encode_example({"instruction": instruction, "input": "", "output": response}, tok, 512)
        assert tok.decode(input_ids + labels[-1:]) == prompt + response
        n_prompt = sum(1 for label in labels if label == -100) + 1
        assert (
            tok.decode(input_ids[:n_prompt]) == prompt
            and tok.decode_continuation(input_ids[:n_prompt], labels[n_prompt - 1 :]) == response
        )


def test_tokenizer_json_identity_and_errors(tmp_path):
    path = byte_level_tokenizer(tmp_path / "a")
    a = Tokenizer(path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert Tokenizer(tmp_path / "b").sha256 == a.sha256
    (tmp_path / "b" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    assert Tokenizer(tmp_path / "b").sha256 != a.sha256  # another EOS encodes every example differently
    (tmp_path / "b" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|nope|>"})
    )
    with pytest.raises(ValueError, match=r"tokenizer.json: eos_token '<\|nope\|>' .* is not in the vocabulary"):
        Tokenizer(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").unlink()
    with pytest.raises(
        ValueError, match="tokenizer.json: no bos_token in .*tokenizer_config.json or .*special_tokens_map.json"
    ):
        Tokenizer(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not an HF tokenizer.json"):
        Tokenizer(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)


# ------------------------------------------------------------------------------------ special-token ids


def test_special_ids_survive_save_and_convert(tmp_path):
    """A checkpoint whose config.json names ids Llama-2 does not have (BOS 7, EOS [8, 9]) and whose
    tokenizer.json says otherwise (BOS 0, EOS 4): save_pretrained, the convert CLI and export_tokenizer all
    write the config.json's ids back, and transformers reads them there."""
    from c2a.data.tokenizer import export_tokenizer
    from c2a.model.convert import main as convert_main

    src = tmp_path / "src"
    byte_level_tokenizer(src)
    family_hf(bos=7, eos=[8, 9]).save_pretrained(src)
    model = load_pretrained(src, dtype=torch.float32)
    assert (model.cfg.bos_token_id, model.cfg.eos_token_id) == (7, (8, 9))
    saved = save_pretrained(model, tmp_path / "saved")
    assert export_tokenizer(src / "tokenizer.json", saved) == ["tokenizer.json", "tokenizer_config.json"]
    assert convert_main([str(src), str(tmp_path / "converted"), "--to", "hf"]) == 0
    for out in (saved, tmp_path / "converted"):
        config = json.loads((out / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (7, [8, 9]), out
        read = transformers.AutoConfig.from_pretrained(out)
        assert (read.bos_token_id, read.eos_token_id) == (7, [8, 9]), out
        assert transformers.GenerationConfig.from_model_config(read).eos_token_id == [8, 9]  # where generate stops


def test_special_ids_fallback_to_the_tokenizer(tmp_path):
    """The tokenizer's BOS / EOS fill only what the checkpoint does not name: a Meta params.json (no ids:
    Llama-2's 1 / 2 until a tokenizer says otherwise, and none written into params.json), a config.json
    with null; export_tokenizer fills a null and leaves a named id alone."""
    from c2a.data.tokenizer import export_tokenizer
    from c2a.model.weights import CheckpointReader, save_meta, with_tokenizer_ids

    tok = Tokenizer(byte_level_tokenizer(tmp_path / "tok"))
    family_hf(bos=7, eos=[8, 9]).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    meta = save_meta(model.cfg, model.named_parameters(), tmp_path / "meta")
    assert not {"bos_token_id", "eos_token_id"} & set(json.loads((meta / "params.json").read_text()))
    reader = CheckpointReader(meta)
    assert (reader.config.bos_token_id, reader.config.eos_token_id, reader.named_ids) == (1, 2, frozenset())
    filled = with_tokenizer_ids(reader.config, reader.named_ids, tok.bos_id, tok.eos_id)
    assert (filled.bos_token_id, filled.eos_token_id) == (0, 4)
    reader = CheckpointReader(tmp_path / "hf")
    assert (
        with_tokenizer_ids(reader.config, reader.named_ids, tok.bos_id, tok.eos_id) == reader.config
    )  # config.json wins
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"eos_token_id": None}))
    reader = CheckpointReader(tmp_path / "hf")
    assert (reader.config.eos_token_id, reader.named_ids) == (None, frozenset({"bos_token_id"}))
    filled = with_tokenizer_ids(reader.config, reader.named_ids, tok.bos_id, tok.eos_id)
    assert (filled.bos_token_id, filled.eos_token_id) == (7, 4)
    out = save_pretrained(Llama(reader.config), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None  # null written back as null
    export_tokenizer(tok.path, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (7, 4)


def test_special_ids_of_the_wrong_type_are_named(family_dir, tmp_path):
    path, _ = family_dir
    shutil.copytree(path, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    for key, value, want in [
        ("eos_token_id", "two", "eos_token_id must be a non-negative integer, a list of them or null, got str 'two'"),
        ("eos_token_id", [8, "9"], "eos_token_id must be .* got list \\[8, '9'\\]"),
        ("bos_token_id", [1], "bos_token_id must be a non-negative integer or null, got list \\[1\\]"),
    ]:
        (tmp_path / "bad" / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'bad' / 'config.json'))}: {want}"):
            load_pretrained(tmp_path / "bad")


# ----------------------------------------------------- fine-tuning a tied, llama3, tokenizer.json checkpoint

# configs/llama3.2-1b-alpaca.toml (the recipe for this kind of checkpoint) with the sizes of a CPU test
RUN = [
    "--config=configs/llama3.2-1b-alpaca.toml",
    "--train.dtype=fp32",
    "--train.save_every_minutes=0",
    "--data.max_len=64",
    "--train.micro_batch=1",
    "--train.global_batch=16",
    "--train.progress=false",
    "--train.log_every=1",
    "--train.max_steps=3",
    "--train.save_every=1",
    "--train.lr=1e-3",
    "--train.activation_checkpointing=full",
]


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """torchrun, 2 gloo ranks: `--model.checkpoint=DIR --data.path=FILE` with DIR holding a tied GQA llama3
    model saved by transformers and only a tokenizer.json (with a chat_template); 3 steps, a checkpoint after
    each; the data file mixes Alpaca records and chat records."""
    work = tmp_path_factory.mktemp("family-run")
    ckpt = work / "ckpt"
    tok = Tokenizer(byte_level_tokenizer(ckpt))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": LLAMA3_STYLE}))
    # a padded vocabulary, as real models have; Llama-3.1-Instruct's kind of EOS list (end_of_text, eot_id)
    family_hf(vocab=tok.vocab_size + 4, std=0.1, bos=tok.bos_id, eos=[1, tok.eos_id]).save_pretrained(ckpt)
    data = work / "mixed.jsonl"
    records = demo_split(64, 4, seed=5)[0]
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"] + " " + r["input"]},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in records[48:]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:48] + chats))
    out = work / "out"
    proc = run_train(2, out, *RUN, f"--model.checkpoint={ckpt}", f"--data.path={data}", tiny=False)
    return ckpt, data, out, proc


def _rows(out: Path, step: int) -> list:
    dataset = TokenizedDataset.open(out / "data_cache")
    global_rows = trainer_state(sorted((out / "checkpoints").iterdir())[-1])["data"]["global_batch_rows"]
    return step_rows(dataset, step, global_rows, mode="packed", seq_len=64)


def test_family_finetune_trains_tied_and_exports_tied(family_run):
    ckpt, _, out, proc = family_run
    assert f"pretrained {ckpt}" in proc.stderr
    manifest = json.loads((out / "data_cache" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == Tokenizer(ckpt).sha256  # tokenized with the checkpoint's tokenizer.json
    assert manifest["chat_template"]["name"] == f"chat_template of {ckpt / 'tokenizer_config.json'}"  # and its template
    logged = metrics(out)
    source = load_pretrained(ckpt, dtype=torch.float32)
    assert logged[0]["loss"] == pytest.approx(loss_on_rows(source, _rows(out, 1)), rel=1e-5)
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_type"] == "llama3"
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        0,
        [1, 4],
    )  # the checkpoint's list, not the tokenizer's one EOS
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (final / name).read_bytes() == (ckpt / name).read_bytes()
    # the template the chat records were trained with, where transformers and `c2a.generate --template auto` look first
    assert (final / "chat_template.jinja").read_text() == LLAMA3_STYLE
    assert transformers.AutoTokenizer.from_pretrained(final).chat_template == LLAMA3_STYLE
    assert not (final / "tokenizer.model").exists()
    with safe_open(final / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(list(f.keys())) == 20  # as the source: one [V, D] matrix
    exported = load_pretrained(final, dtype=torch.float32)
    assert exported.output.weight is exported.tok_embeddings.weight
    assert loss_on_rows(exported, _rows(out, 3)) == pytest.approx(logged[-1]["loss"], rel=1e-5)
    assert not torch.equal(exported.tok_embeddings.weight, source.tok_embeddings.weight)
    hf = transformers.LlamaForCausalLM.from_pretrained(final, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(0, exported.cfg.vocab_size, (2, 90))
    with torch.no_grad():
        assert rel_err(exported(ids), hf(ids).logits) < 1e-5


def test_finetune_from_meta_takes_the_tokenizers_ids(tmp_path):
    """A Meta checkpoint names no special tokens: fine-tuned with a tokenizer.json, final/config.json holds
    that tokenizer's BOS / EOS (the ones every example was trained with), not Llama-2's 1 / 2."""
    from c2a.model.weights import save_meta

    tok = Tokenizer(byte_level_tokenizer(tmp_path / "tok"))
    family_hf(vocab=tok.vocab_size + 4, std=0.1).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    meta = save_meta(model.cfg, model.named_parameters(), tmp_path / "meta")
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_split(32, 4, seed=5)[0]))
    run_train(
        1,
        tmp_path / "out",
        *RUN,
        "--train.max_steps=1",
        f"--model.checkpoint={meta}",
        f"--data.path={data}",
        f"--data.tokenizer={tok.path}",
        tiny=False,
    )
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id) == (0, 4)
    # Alpaca records only: the export names Alpaca's prompt as its template, so --template auto prompts as trained
    assert (tmp_path / "out" / "final" / "chat_template.jinja").read_text() == ALPACA_TEMPLATE


def test_family_finetune_resumes_tied(family_run, tmp_path):
    """The run's directory without its last checkpoint and export: the same command resumes from step 2 and
    trains step 3 to the same loss and the same tied weights."""
    ckpt, data, out, _ = family_run
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(sorted((resumed / "checkpoints").iterdir())[-1])
    proc = run_train(2, resumed, *RUN, f"--model.checkpoint={ckpt}", f"--data.path={data}", tiny=False)
    assert "resumed from step_00000002" in proc.stderr
    assert metrics(resumed)[-1]["step"] == 3 and metrics(resumed)[-1]["loss"] == pytest.approx(
        metrics(out)[-1]["loss"], rel=1e-6
    )
    a, b = load_pretrained(out / "final", dtype=torch.float32), load_pretrained(resumed / "final", dtype=torch.float32)
    torch.testing.assert_close(b.tok_embeddings.weight, a.tok_embeddings.weight, rtol=1e-6, atol=1e-7)
    assert b.output.weight is b.tok_embeddings.weight


def test_logits_match_hf_on_triton_kernels(family_dir, monkeypatch):
    """The same parity with every op on the Triton kernels (interpreted on CPU): the rotary kernel takes the
    llama3-scaled frequencies, the loss head the tied matrix."""
    monkeypatch.setenv("C2A_KERNELS", "triton")
    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 263, (1, 80))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5
        labels = torch.randint(0, 263, (1, 80))
        ref = torch.nn.functional.cross_entropy(hf(ids).logits[0], labels[0])
        assert model.loss(ids, labels).item() == pytest.approx(ref.item(), rel=1e-5)


def test_meta_export_round_trip_tied_scaled(family_dir, tmp_path):
    """Meta's layout: a tied model stores no output.weight (as Llama-3.2's consolidated.00.pth) and
    params.json carries use_scaled_rope and its factors; both read back to the same model."""
    from c2a.model.weights import save_meta

    path, hf = family_dir
    model = load_pretrained(path, dtype=torch.float32)
    out = save_meta(model.cfg, model.named_parameters(), tmp_path / "meta")
    params = json.loads((out / "params.json").read_text())
    assert (
        params["use_scaled_rope"] is True
        and params["rope_scaling_factor"] == 8.0
        and params["original_max_seq_len"] == 64
    )
    with safe_open(out / "consolidated.00.safetensors", "pt") as f:
        assert "output.weight" not in f.keys()
    back = load_pretrained(out, dtype=torch.float32)
    # params.json has no max_seq_len (Meta's loader passes its own; c2a reads 4096 back)
    assert back.cfg == model.cfg.replace(max_seq_len=4096) and back.output.weight is back.tok_embeddings.weight
    ids = torch.randint(0, 263, (1, 90))
    with torch.no_grad():
        assert rel_err(back(ids), hf(ids).logits) < 1e-5
