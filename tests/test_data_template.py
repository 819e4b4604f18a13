"""Alpaca template, example encoding (round trip, masking) and the over-length policy."""

from __future__ import annotations

import random

import pytest

from c2a.data import IGNORE_INDEX, Tokenizer, encode_example, encode_example_full, format_prompt
from c2a.data.demo import DEMO_TOKENIZER, demo_split

# Stanford Alpaca's PROMPT_DICT (train.py), written out here by hand, newline by newline.
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName three colors.\n\n### Response:"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:"
)


def test_templates_character_for_character() -> None:
    assert format_prompt("Name three colors.") == ALPACA_NO_INPUT
    assert format_prompt("Name three colors.", "") == ALPACA_NO_INPUT
    assert format_prompt("Translate to French.", "Good morning") == ALPACA_INPUT
    # Alpaca picks the input variant for any non-empty input, even whitespace; braces are not re-formatted
    assert "### Input:\n \n\n### Response:" in format_prompt("x", " ")
    assert format_prompt("{input} {x}").endswith("### Instruction:\n{input} {x}\n\n### Response:")


@pytest.fixture(scope="module")
def demo_tok() -> Tokenizer:
    return Tokenizer(DEMO_TOKENIZER)


def _tricky_records(n: int, seed: int) -> list[dict[str, str]]:
    """Records that stress the prompt/response boundary: leading spaces/newlines, unicode, code, digits."""
    rng = random.Random(seed)
    starts = [
        "",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        ":",
        "::",
        "###",
        "-",
        "1.",
        "'",
        '"',
        "Response",
        "é",
        "日本",
        "🙂",
        "```",
    ]
    bodies = [
        "The capital of France is Paris.",
        "def f(x):\n    return x + 1\n",
        "1. eggs\n2. milk",
        "sure!!",
        "Ça va très bien, merci.",
        "東京は日本の首都です。",
        "x = 3.14159 * r ** 2",
        "   indented  text   ",
        "a\tb\tc",
        "emoji 🎉 party",
        "Line one\r\nLine two",
        "  trailing space ",
        "URL: https://example.com/a?b=c",
    ]
    out = []
    for _i in range(n):
        out.append(
            {
                "instruction": rng.choice(bodies) + rng.choice(["", " ", "\n"]),
                "input": rng.choice(["", "", rng.choice(starts) + rng.choice(bodies)]),
                "output": rng.choice(starts) + rng.choice(bodies) + rng.choice(["", " ", "\n", "."]),
            }
        )
    return out


def _check_encoding(tok: Tokenizer, record: dict[str, str], max_len: int = 4096) -> None:
    prompt = format_prompt(record["instruction"], record["input"])
    input_ids, labels = encode_example(record, tok, max_len)
    tokens = input_ids + labels[-1:]
    assert len(input_ids) == len(labels)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    # shifted: labels[t] is the target of position t
    assert all(lab == IGNORE_INDEX or lab == tokens[t + 1] for t, lab in enumerate(labels))
    # the prompt is tokenized exactly as at generation time, and none of its targets is trained
    prompt_ids = tok.encode(prompt, bos=True)
    lp = len(prompt_ids)
    assert tokens[:lp] == prompt_ids
    assert labels[: lp - 1] == [IGNORE_INDEX] * (lp - 1)
    # every response target and the EOS are trained
    assert labels[lp - 1 :] == tokens[lp:]
    # decoding gives back exactly prompt + response: no dummy-prefix space at the boundary
    assert tok.decode(tokens) == prompt + record["output"]
    assert tok.decode_continuation(prompt_ids, tokens[lp:]) == record["output"]


def test_encode_round_trip_and_masking_demo(demo_tok: Tokenizer) -> None:
    train, heldout = demo_split(n_train=1000, n_heldout=200, seed=3)
    for r in train + heldout:
        _check_encoding(demo_tok, r)
    # the first response piece carries no space mark: "### Response:" is followed directly by the answer
    _ids, labels = encode_example(
        {"instruction": "Copy the text.", "input": "cat dog", "output": "cat dog"}, demo_tok, 512
    )
    first_trained = next(x for x in labels if x != IGNORE_INDEX)
    assert demo_tok.piece(first_trained) == "cat"


def test_encode_round_trip_and_masking_real_tokenizer(real_tokenizer_path) -> None:
    tok = Tokenizer(real_tokenizer_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    records = _tricky_records(600, seed=0) + demo_split(n_train=200, n_heldout=0, seed=1)[0]
    for r in records:
        _check_encoding(tok, r)
    # a plain separate encoding would insert a space: the continuation encoder must not
    r = {"instruction": "Say hi.", "input": "", "output": "Hello"}
    _ids, labels = encode_example(r, tok, 2048)
    assert tok.piece(labels[-2]) == "Hello"
    assert tok.decode(tok.encode(format_prompt("Say hi.")) + tok.encode("Hello", bos=False)).endswith("Response: Hello")


def test_tokenizer_interface(demo_tok: Tokenizer) -> None:
    assert demo_tok.encode("cat", bos=True, eos=True)[0] == 1 and demo_tok.encode("cat", bos=True, eos=True)[-1] == 2
    assert demo_tok.encode("cat", bos=False) == demo_tok.encode_continuation(" cat")
    assert demo_tok.vocab_size == 512
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer("/nonexistent/tokenizer.model")


def _long_record(n_instr: int, n_out: int) -> dict[str, str]:
    return {"instruction": " ".join(["cat"] * n_instr), "input": "", "output": " ".join(["dog"] * n_out)}


def test_truncation_cuts_prompt_middle_and_keeps_response(demo_tok: Tokenizer) -> None:
    r = _long_record(200, 4)
    prompt = demo_tok.encode(format_prompt(r["instruction"]), bos=True)
    response = demo_tok.encode_continuation(r["output"], eos=True)
    assert len(response) == 8  # 4 words, 3 spaces (pieces of their own), EOS
    enc = encode_example_full(r, demo_tok, max_len=40)
    assert enc.truncated and not enc.dropped
    tokens = enc.input_ids + enc.labels[-1:]
    assert len(enc.input_ids) == 40  # budget: 41 tokens
    # the whole response and its EOS are kept; the prompt keeps its head (BOS, template start) and tail
    # ("### Response:"): 41 - 8 = 33 prompt tokens = 17 head + 16 tail
    assert tokens[-8:] == response
    assert tokens[:17] == prompt[:17] and tokens[17:33] == prompt[-16:]
    assert [x for x in enc.labels if x != IGNORE_INDEX] == response


def test_truncation_cuts_response_tail_keeping_eos(demo_tok: Tokenizer) -> None:
    r = _long_record(200, 300)
    prompt = demo_tok.encode(format_prompt(r["instruction"]), bos=True)
    response = demo_tok.encode_continuation(r["output"], eos=True)
    enc = encode_example_full(r, demo_tok, max_len=63)
    tokens = enc.input_ids + enc.labels[-1:]
    assert len(tokens) == 64
    # the prompt keeps budget // 2 = 32 tokens (16 head + 16 tail), the response the other 32: 31 + EOS
    assert tokens[:16] == prompt[:16] and tokens[16:32] == prompt[-16:]
    assert tokens[32:] == response[:31] + [demo_tok.eos_id]
    assert enc.labels[-1] == demo_tok.eos_id and sum(x != IGNORE_INDEX for x in enc.labels) == 32
    # a short prompt with a long response: the prompt is untouched
    r = {"instruction": "Copy the text.", "input": "", "output": " ".join(["dog"] * 300)}
    prompt = demo_tok.encode(format_prompt(r["instruction"]), bos=True)
    ids, labels = encode_example(r, demo_tok, 100)
    assert ids[: len(prompt)] == prompt and len(ids) == 100 and labels[-1] == demo_tok.eos_id


def test_truncation_drop_policy_and_untouched_fits(demo_tok: Tokenizer) -> None:
    r = _long_record(30, 3)
    full = encode_example_full(r, demo_tok, max_len=4096)
    n = len(full.input_ids)
    exact = encode_example_full(r, demo_tok, max_len=n)
    assert not exact.truncated and exact.input_ids == full.input_ids and exact.labels == full.labels
    assert encode_example_full(r, demo_tok, max_len=n - 1).truncated
    dropped = encode_example_full(r, demo_tok, max_len=n - 1, truncation="drop")
    assert dropped.dropped and dropped.input_ids == []
    with pytest.raises(ValueError, match="unknown truncation policy"):
        encode_example_full(r, demo_tok, max_len=64, truncation="left")  # type: ignore[arg-type]
