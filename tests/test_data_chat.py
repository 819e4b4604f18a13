"""Chat data: `messages` records under a Jinja chat template, loss on the assistant turns only.

Oracles: transformers' apply_chat_template (rendering and token ids) for a Llama-3-style template over a
byte-level tokenizer.json trained in the test; Meta's Llama-2-chat dialog encoding (llama/generation.py's
rule, written out here) with Meta's real tokenizer; the Alpaca encoding for the `alpaca` built-in.
"""

from __future__ import annotations

import json

import pytest
import transformers
from test_family import LLAMA3_STYLE, byte_level_tokenizer

from c2a.data import DataError, TokenizedDataset, Tokenizer, encode_example, load_records
from c2a.data.alpaca import encode_example_full
from c2a.data.chat import ChatTemplateError, encode_chat, render_chat
from c2a.data.demo import DEMO_TOKENIZER

CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green and blue."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "héllo ✓"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "And 9 times 7?"},
        {"role": "assistant", "content": "63\n(nine sevens)"},
    ],
]


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """(c2a Tokenizer, transformers tokenizer) over one byte-level tokenizer.json with the template above."""
    directory = tmp_path_factory.mktemp("chat-tok")
    byte_level_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": LLAMA3_STYLE}))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token=config["bos_token"], eos_token=config["eos_token"]
    )
    hf.chat_template = LLAMA3_STYLE
    return Tokenizer(directory), hf


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def trained_runs(tokens: list[int], trained: list[bool]) -> list[list[int]]:
    runs, current = [], []
    for t, m in zip(tokens, trained):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system-two-turns"])
def test_checkpoint_template_matches_transformers(llama3_style, conversation):
    tok, hf = llama3_style
    assert tok.chat_template == LLAMA3_STYLE
    text = render_chat(tok.chat_template, conversation, tok)
    assert text == hf.apply_chat_template(conversation, tokenize=False)
    tokens, trained = encode_chat({"messages": conversation}, tok, tok.chat_template)
    assert tokens == _ids(hf.apply_chat_template(conversation, tokenize=True))
    assert tok.decode(tokens) == text.replace(tok.bos_token, "").replace(
        tok.eos_token, ""
    )  # decode leaves out BOS/EOS, as for Alpaca
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    # exactly each assistant turn and its end-of-turn token, nothing of the prompts or headers
    assert [tok.decode(run[:-1]) for run in trained_runs(tokens, trained)] == answers
    assert all(run[-1] == tok.special_tokens["<|eot_id|>"] for run in trained_runs(tokens, trained))
    input_ids, labels = encode_example({"messages": conversation}, tok, 512)
    assert input_ids == tokens[:-1] and [t for t in labels if t != -100] == [t for t, m in zip(tokens, trained) if m]


def test_alpaca_builtin_equals_alpaca_records(llama3_style):
    """One user turn and its answer under the `alpaca` built-in are exactly the Alpaca record's tokens and labels
    (a system message as the record's input), with SentencePiece and with a tokenizer.json."""
    for tok in (Tokenizer(DEMO_TOKENIZER), llama3_style[0]):
        for system in ("", "5 2 7"):
            record = {"instruction": "sort: 3 1 2", "input": system, "output": "1 2 3"}
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["output"]},
            ]
            got = encode_example_full({"messages": messages}, tok, 256, template="alpaca")
            assert (got.input_ids, got.labels) == encode_example(record, tok, 256)


def test_llama2_chat_builtin_is_metas_dialog_encoding(real_tokenizer_path):
    """Meta's chat_completion: the system prompt wrapped into the first user turn, then per (user, answer)
    pair encode(f"[INST] {user} [/INST] {answer} ", bos, eos); loss on " {answer} " and its EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    tok = Tokenizer(real_tokenizer_path)
    system, turns = "Be brief.", [("What is 2+2?", "4, of course."), ("And times 3?", "Twelve.")]
    messages = [{"role": "system", "content": system}]
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    want, want_trained = [], []
    for i, (user, answer) in enumerate(turns):
        user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}" if i == 0 else user
        prompt = [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST]")
        full = [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST] {answer} ") + [sp.eos_id()]
        assert full[: len(prompt)] == prompt  # Meta's one encode splits at the same place c2a cuts
        want += full
        want_trained += [False] * len(prompt) + [True] * (len(full) - len(prompt))
    tokens, trained = encode_chat({"messages": messages}, tok, render_and_name("llama2-chat"))
    assert tokens == want and trained == want_trained


def render_and_name(name: str) -> str:
    from c2a.data.chat import BUILTIN_TEMPLATES

    return BUILTIN_TEMPLATES[name]


def test_chat_truncation_keeps_the_head(llama3_style):
    tok, _ = llama3_style
    conversation = CONVERSATIONS[1]
    tokens, trained = encode_chat({"messages": conversation}, tok, tok.chat_template)
    first_answer_end = trained.index(True) + trained[trained.index(True) :].index(False)
    max_len = first_answer_end + 2  # the first answer whole, a little of what follows
    got = encode_example_full({"messages": conversation}, tok, max_len)
    assert got.truncated and len(got.input_ids) == max_len and got.input_ids == tokens[:max_len]
    assert got.labels == [t if m else -100 for t, m in zip(tokens[1 : max_len + 1], trained[1 : max_len + 1])]
    assert encode_example_full({"messages": conversation}, tok, max_len, truncation="drop").dropped
    assert encode_example_full({"messages": conversation}, tok, trained.index(True) - 2).dropped  # no answer token left


def test_chat_records_errors(llama3_style, tmp_path):
    tok, _ = llama3_style
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": CONVERSATIONS[0]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": "hello"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"chat.jsonl:2: no assistant message: nothing to train on"):
        load_records(path)
    loaded = load_records(path, skip_bad_rows=True)
    assert (
        len(loaded.records) == 1 and "messages[0] has role 'robot'; valid: system, user, assistant" in loaded.skipped[1]
    )
    assert "field 'messages' must be a non-empty list" in loaded.skipped[2]
    with pytest.raises(ChatTemplateError, match="does not render turn by turn"):  # a template that reorders turns
        encode_chat(
            {"messages": CONVERSATIONS[1]}, tok, "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
        )
    with pytest.raises(ValueError, match="unknown chat template 'chatml'; valid: auto, tokenizer, alpaca, llama2-chat"):
        TokenizedDataset.from_records(loaded.records, tok, 64, template="chatml")
    refusing = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + LLAMA3_STYLE
    )
    (tmp_path / "t").mkdir()
    byte_level_tokenizer(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": refusing}))
    with pytest.raises(DataError, match="record 1 .*the chat template refused the conversation: no system role"):
        TokenizedDataset.from_records(
            [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[1]}], Tokenizer(tmp_path / "t"), 64
        )
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json has no chat_template; name a built-in one"):
        encode_example_full({"messages": CONVERSATIONS[0]}, Tokenizer(DEMO_TOKENIZER), 64, template="tokenizer")


def test_mixed_file_cache_records_template(llama3_style, tmp_path):
    """Alpaca and chat records in one file: Alpaca records keep Alpaca's encoding, chat records the
    checkpoint's template, and the cache's manifest names the template."""
    tok, _ = llama3_style
    alpaca = {"instruction": "sort: 3 1 2", "input": "", "output": "1 2 3"}
    ds = TokenizedDataset.from_records([alpaca, {"messages": CONVERSATIONS[1]}], tok, 256)
    assert ds.manifest["chat_template"]["name"].startswith("chat_template of ")
    assert [list(a) for a in ds[0]] == [list(x) for x in encode_example(alpaca, tok, 256)]
    assert list(ds[1][0]) == encode_chat({"messages": CONVERSATIONS[1]}, tok, tok.chat_template)[0][:-1]
    assert "chat_template" not in TokenizedDataset.from_records([alpaca], tok, 256).manifest


def test_cache_checks_the_chat_template(llama3_style, tmp_path):
    """A run's cache of chat records is reused only under the same template (resume with another
    data.template, or an edited chat_template, is refused rather than training on stale renderings)."""
    from c2a.data import CacheMismatchError

    tok, _ = llama3_style
    TokenizedDataset.from_records([{"messages": CONVERSATIONS[1]}], tok, 256).save(tmp_path / "cache")
    TokenizedDataset.open(tmp_path / "cache", expect_tokenizer=tok, expect_template="auto")
    with pytest.raises(
        CacheMismatchError,
        match=r"chat records were rendered with chat_template of .*tokenizer_config.json "
        r"\(sha256 \w+\.\.\.\), expected alpaca \(sha256 \w+\.\.\.\)",
    ):
        TokenizedDataset.open(tmp_path / "cache", expect_tokenizer=tok, expect_template="alpaca")
