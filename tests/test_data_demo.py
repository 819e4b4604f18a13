"""The bundled demo task: determinism, disjoint split, answers checked by an independent solver, tokenizer asset."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from c2a.config import LlamaConfig
from c2a.data import Tokenizer, encode_example, format_prompt
from c2a.data.demo import (
    DEMO_TOKENIZER,
    DIGIT_WORDS,
    TASKS,
    WORDS,
    closed_words,
    demo_split,
    exact_match,
    generate_records,
    make_tokenizer,
    record_key,
)

NUMBER_NAMES = "zero one two three four five six seven eight nine".split()


def solve(record: dict[str, str]) -> str:
    """The answer, worked out from the prompt text alone (independently of the generator)."""
    text = record["input"] or record["instruction"]  # the data, or the instruction that holds it inline
    words = [w for w in re.findall(r"[a-z]+", text) if w in WORDS]
    digits = [int(d) for d in re.findall(r"\d", text)]
    task = record["task"]
    return {
        "reverse": lambda: " ".join(words[::-1]),
        "copy": lambda: " ".join(words),
        "first": lambda: words[0],
        "last": lambda: words[-1],
        "count": lambda: str(len(words)),
        "uppercase": lambda: " ".join(w.upper() for w in words),
        "sort": lambda: " ".join(map(str, sorted(digits))),
        "max": lambda: str(max(digits)),
        "add": lambda: str(sum(digits)),
        "spell": lambda: " ".join(NUMBER_NAMES[d] for d in digits),
    }[task]()


def test_generator_is_deterministic_and_seeded() -> None:
    assert generate_records(200, seed=1) == generate_records(200, seed=1)
    assert generate_records(200, seed=1) != generate_records(200, seed=2)
    assert demo_split(300, 50, seed=0) == demo_split(300, 50, seed=0)


def test_answers_are_right() -> None:
    records = generate_records(3000, seed=4)
    assert set(Counter(r["task"] for r in records)) == set(TASKS)
    with_input = sum(r["input"] != "" for r in records)
    assert 0.4 < with_input / len(records) < 0.6
    for r in records:
        assert solve(r) == r["output"], r
        assert set(r) == {"instruction", "input", "output", "task"}
    # several phrasings per task
    for task in TASKS:
        phrasings = {r["instruction"] for r in records if r["task"] == task and r["input"]}
        assert len(phrasings) >= 3, task


def test_split_sizes_and_disjointness() -> None:
    train, heldout = demo_split()
    assert len(train) == 20000 and len(heldout) == 500
    held_keys = {record_key(r) for r in heldout}
    assert len(held_keys) == 500
    assert not held_keys & {record_key(r) for r in train}
    assert set(Counter(r["task"] for r in heldout)) == set(TASKS)


def test_exact_match() -> None:
    r = {
        "instruction": "Reverse the order of these words.",
        "input": "cat dog sun",
        "output": "sun dog cat",
        "task": "reverse",
    }
    assert exact_match(r, "sun dog cat")
    assert exact_match(r, " sun dog cat\n")
    assert not exact_match(r, "sun dog")
    assert not exact_match(r, "sun dog cat cat")
    assert not exact_match(r, "sun  dog cat")
    assert not exact_match(r, "SUN DOG CAT")
    assert not exact_match(r, "")


def test_tokenizer_asset_is_what_the_script_makes(tmp_path: Path) -> None:
    committed = Tokenizer(DEMO_TOKENIZER)
    fresh = Tokenizer(make_tokenizer(tmp_path / "demo.model"))
    assert committed.vocab_size == fresh.vocab_size == 512 == LlamaConfig.from_name("demo").vocab_size
    # same pieces, in the same order (bytes may differ across sentencepiece versions, ids must not)
    assert [committed.piece(i) for i in range(512)] == [fresh.piece(i) for i in range(512)]
    assert (committed.bos_id, committed.eos_id, committed.piece(0)) == (1, 2, "<unk>")
    assert DEMO_TOKENIZER.stat().st_size < 16_000


@pytest.fixture(scope="module")
def demo_tok() -> Tokenizer:
    return Tokenizer(DEMO_TOKENIZER)


def test_demo_text_encodes_without_unknowns_and_words_are_single_pieces(demo_tok: Tokenizer) -> None:
    train, heldout = demo_split(n_train=2000, n_heldout=500, seed=0)
    lengths, responses = [], []
    for r in train + heldout:
        ids, labels = encode_example(r, demo_tok, 512)
        assert demo_tok.unk_count(ids + labels[-1:]) == 0, r
        lengths.append(len(ids))
        responses.append(sum(x != -100 for x in labels))
    # short enough for a 4-layer model on 2 CPU cores: the template's fixed text is five pieces, so an
    # example is ~21 tokens and an answer at most 10 (5 words, 4 spaces, EOS)
    assert max(lengths) <= 34 and max(responses) <= 10
    assert len(demo_tok.encode(format_prompt("Copy the text.", "cat dog"))) == 1 + 3 + 4 + 1 + 3 + 1
    # every content word is one piece with one id wherever it stands (after a space, at a line start, after
    # "Response:"), and the space before it is a piece of its own
    space = demo_tok.encode_continuation(" ")
    assert len(space) == 1
    for w in closed_words() + [str(d) for d in range(10)]:
        alone = demo_tok.encode_continuation(w)
        assert len(alone) == 1, w
        assert demo_tok.encode_continuation(" " + w) == space + alone, w
        assert demo_tok.encode_continuation("\n" + w)[-1:] == alone, w
    for w in DIGIT_WORDS:
        assert demo_tok.encode(w, bos=False) == space + demo_tok.encode_continuation(w), w
    # digits are split: a two-digit number is two pieces
    assert len(demo_tok.encode_continuation("12")) == 2
    assert demo_tok.decode(demo_tok.encode(format_prompt("Copy the text.", "cat dog"))) == format_prompt(
        "Copy the text.", "cat dog"
    )
