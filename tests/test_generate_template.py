"""`python -m c2a.generate --template ...`: an instruction prompted through a chat template, not only Alpaca's.

Oracles: transformers' AutoTokenizer.apply_chat_template(add_generation_prompt=True, tokenize=True) on the
same directory (a byte-level tokenizer.json trained in test_family, a Llama-3-style template whose turns end
with <|eot_id|> while EOS is <|end_of_text|>, as in Llama-3-Instruct); Meta's Llama-2-chat prompt rule
for the llama2-chat built-in; the Alpaca prompt for the default. End to end: the CLI in a subprocess on a
tiny model built to answer one piece and then <|eot_id|>.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from bigram_model import bigram_llama
from test_eval_cli import run_cli
from test_family import LLAMA3_STYLE, byte_level_tokenizer

from c2a.config import LlamaConfig
from c2a.data import Tokenizer, format_prompt
from c2a.data.chat import ALPACA_TEMPLATE, ChatTemplateError
from c2a.data.demo import DEMO_TOKENIZER
from c2a.inference import prompt_format
from c2a.model import save_pretrained

INSTRUCTION, INPUT = "Name three colours.", "héllo ✓"
# a different template, to tell which file a directory's template came from
DECOY = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|eot_id|>{% endif %}"


def chat_dir(directory: Path, where: str = "tokenizer_config.json") -> Path:
    """A byte-level tokenizer.json whose EOS is <|end_of_text|> and whose chat template (LLAMA3_STYLE) is in
    tokenizer_config.json or in chat_template.jinja (then tokenizer_config.json holds a decoy: the file wins)."""
    byte_level_tokenizer(directory)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if where == "tokenizer_config.json":
        config["chat_template"] = LLAMA3_STYLE
    else:
        config["chat_template"] = DECOY
        (directory / "chat_template.jinja").write_text(LLAMA3_STYLE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def hf_ids(directory: Path, content: str) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    out = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
@pytest.mark.parametrize("name", ["tokenizer", "auto"])
def test_chat_prompt_ids_equal_transformers(tmp_path, where, name):
    directory = chat_dir(tmp_path / "tok", where)
    tok = Tokenizer(directory)
    fmt = prompt_format(name, tok)
    assert fmt.source == LLAMA3_STYLE and fmt.label == f"chat_template of {directory / where}"
    for input_ in ("", INPUT):
        ids = fmt.encode(tok, INSTRUCTION, input_)
        # the instruction and the input after an empty line, as one user turn (AlpacaEval folds inputs this way)
        assert ids == hf_ids(directory, INSTRUCTION + (f"\n\n{input_}" if input_ else ""))
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # the template's BOS, and no second one
        assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the generation prompt
    eot = tok.special_tokens["<|eot_id|>"]
    assert tok.eos_id != eot and fmt.stop_ids == (tok.eos_id, eot)


def test_llama2_chat_builtin_is_metas_prompt():
    """Meta's chat_completion encodes one user turn as encode(f"[INST] {content.strip()} [/INST]", bos=True)."""
    tok = Tokenizer(DEMO_TOKENIZER)
    fmt = prompt_format("llama2-chat", tok)
    assert fmt.encode(tok, " sort: 3 1 2 ") == tok.encode("[INST] sort: 3 1 2 [/INST]", bos=True)
    assert fmt.stop_ids == (tok.eos_id,)  # its turns end with EOS


def test_alpaca_default_auto_without_template_and_an_alpaca_export(tmp_path):
    """alpaca, auto on a tokenizer without a chat template, and a chat_template.jinja holding Alpaca's (what the
    trainer exports for an Alpaca run) all give the Alpaca prompt exactly, "### Input:" variant included."""
    plain = Tokenizer(DEMO_TOKENIZER)
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "tokenizer.model").write_bytes(Path(DEMO_TOKENIZER).read_bytes())
    (tmp_path / "exported" / "chat_template.jinja").write_text(ALPACA_TEMPLATE)
    exported = Tokenizer(tmp_path / "exported")
    for tok, name in ((plain, "alpaca"), (plain, "auto"), (exported, "auto"), (exported, "tokenizer")):
        fmt = prompt_format(name, tok)
        assert (fmt.source, fmt.stop_ids) == (None, (tok.eos_id,))
        for input_ in ("", "5 2 7"):
            assert fmt.encode(tok, "sort: 3 1 2", input_) == tok.encode(format_prompt("sort: 3 1 2", input_), bos=True)


def test_template_errors_are_named():
    tok = Tokenizer(DEMO_TOKENIZER)
    with pytest.raises(
        ChatTemplateError, match="unknown chat template 'chatml'; valid: auto, tokenizer, alpaca, llama2-chat"
    ):
        prompt_format("chatml", tok)
    with pytest.raises(
        ChatTemplateError,
        match=r"tokenizer_config.json has no chat_template; name a built-in one \(alpaca, llama2-chat, alpaca-claude2-released\)",
    ):
        prompt_format("tokenizer", tok)


# ----------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[Path, str]:
    """(model dir, its answer): a tiny model whose next token depends on the current one only (blocks add
    nothing: wo = w2 = 0). After the generation prompt's last piece it says ANSWER, after ANSWER
    <|eot_id|>, after <|eot_id|> ANSWER again: only a stop at <|eot_id|> ends the response after one."""
    work = tmp_path_factory.mktemp("chat-model")
    tok = Tokenizer(chat_dir(work / "tok"))
    fmt = prompt_format("tokenizer", tok)
    last = fmt.encode(tok, "x")[-1]
    assert all(fmt.encode(tok, i)[-1] == last for i in (INSTRUCTION, "What is 3 + 4?"))
    answer = tok.encode_continuation("red")[0]
    eot = tok.special_tokens["<|eot_id|>"]
    cfg = LlamaConfig(
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=tok.vocab_size,
        ffn_hidden_dim=48,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    model = bigram_llama(cfg, {answer: (last, eot), eot: (answer,)}, seed=2)
    directory = save_pretrained(model, work / "model")
    for f in tok.files:
        (directory / f.name).write_bytes(f.read_bytes())
    return directory, tok.decode([answer])


def test_cli_answers_through_the_checkpoints_template(chat_model):
    directory, answer = chat_model
    proc = run_cli(
        "c2a.generate",
        "--model",
        str(directory),
        "--template",
        "tokenizer",
        "--prompt",
        INSTRUCTION,
        "--input",
        INPUT,
        "--max-new-tokens",
        "6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == answer + "\n"  # one answer, stopped at <|eot_id|> (not EOS), which is not printed
    proc = run_cli(
        "c2a.generate",
        "--model",
        str(directory),
        "--template",
        "auto",
        "--max-new-tokens",
        "6",
        stdin=f"{INSTRUCTION}\nWhat is 3 + 4?\n",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"{answer}\n\n{answer}\n\n"


def test_cli_template_errors(chat_model, tmp_path):
    directory, _ = chat_model
    proc = run_cli("c2a.generate", "--model", str(directory), "--template", "chatml", "--prompt", "hi")
    assert proc.returncode == 2 and "invalid choice: 'chatml'" in proc.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in directory.iterdir():
        if f.name not in ("tokenizer_config.json", "chat_template.jinja"):
            (plain / f.name).write_bytes(f.read_bytes())
    (plain / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    proc = run_cli("c2a.generate", "--model", str(plain), "--template", "tokenizer", "--prompt", "hi")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"error: {plain / 'tokenizer_config.json'} has no chat_template; name a built-in one"
    ), proc.stderr


def test_eval_answers_through_the_checkpoints_template(chat_model, tmp_path):
    directory, answer = chat_model
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": INSTRUCTION}, {"instruction": "What is 3 + 4?"}]))
    out = tmp_path / "answers.json"
    proc = run_cli(
        "c2a.eval",
        "--model",
        str(directory),
        "--template",
        "tokenizer",
        "--alpaca-eval-prompts",
        str(prompts),
        "--alpaca-eval-out",
        str(out),
        "--max-new-tokens",
        "6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["output"] for r in json.loads(out.read_text())] == [answer, answer]
