"""The bundled demo task: synthetic Alpaca-format instructions with exactly checkable answers.

Real Llama-2 weights and the claude2_alpaca data cannot ship with a fresh clone, so the default training
run fine-tunes the small `demo` model preset on this task and reports held-out exact match. The task is
sized for a ~4-layer, 256-wide model on 2 CPU cores: inputs are a few words or single digits drawn from
closed lists, answers are a handful of tokens, and every task is a copy/reorder/lookup a small transformer
learns quickly (single-digit addition is the only arithmetic).

Task types (the "task" field of each record): reverse, sort, add, uppercase, count, copy, first, last,
max, spell. Each has several phrasings, with the data in the `input` field or inline in the instruction.
The held-out split draws the ten tasks equally often; the training split draws copy, reverse and sort more
often (TRAIN_TASK_WEIGHTS), the tasks the model learns last.

    demo_split(n_train=20000, n_heldout=500, seed=0) -> (train, heldout)   disjoint, deterministic
    exact_match(record, generated_text) -> bool                          generated.strip() == output
    python -m c2a.data.demo --make-tokenizer OUT                          the demo SentencePiece model

The tokenizer asset c2a/data/assets/demo_tokenizer.model (vocab 512, the `demo` preset's vocab_size) is
made by `make_tokenizer`: SentencePiece BPE trained on demo texts, identity normalization (no charsmap,
so the file stays a few KB), digits split, no byte fallback, unk=0 BOS=1 EOS=2 as in Llama, "\\n" a piece,
the template's fixed text as five pieces, and every closed-list word and digit a single piece that never
absorbs the space before it: a space is a piece of its own, so a word has the same id wherever it stands
(after a space, at a line start, right after "### Response:"). Copying, reversing and picking words then
moves identical ids; with separate "cat" / "▁cat" pieces the model must first learn that the two are the
same word, and in 800 steps (batch 64) held-out exact match reached 32% that way against 72% this way.
Demo examples are 11-33 input positions (mean 21), answers 1-9 tokens + EOS.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

from c2a.data.alpaca import format_prompt

DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "demo_tokenizer.model"
DEMO_VOCAB_SIZE = 512  # = LlamaConfig.from_name("demo").vocab_size

WORDS: tuple[str, ...] = (
    "apple",
    "bird",
    "boat",
    "book",
    "cake",
    "cat",
    "cloud",
    "cup",
    "dog",
    "door",
    "duck",
    "fish",
    "frog",
    "bell",
    "key",
    "lamp",
    "leaf",
    "lion",
    "milk",
    "moon",
    "owl",
    "pen",
    "rain",
    "ring",
    "rock",
    "rose",
    "shoe",
    "star",
    "sun",
    "tree",
    "wolf",
    "egg",
)
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each task: phrasings that take the data as `input`, phrasings with the data inline ({x}), and a maker
# returning (data, answer) from a random generator.
Maker = Callable[[random.Random], tuple[str, str]]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _digits(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _words(rng, 2, 5)
    return " ".join(w), " ".join(reversed(w))


def _sort(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng, 2, 5)
    return " ".join(map(str, d)), " ".join(map(str, sorted(d)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b}", str(a + b)


def _uppercase(rng: random.Random) -> tuple[str, str]:
    w = " ".join(_words(rng, 1, 3))
    return w, w.upper()


def _count(rng: random.Random) -> tuple[str, str]:
    w = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
    return " ".join(w), str(len(w))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = " ".join(_words(rng, 2, 5))
    return w, w


def _first(rng: random.Random) -> tuple[str, str]:
    w = _words(rng, 2, 6)
    return " ".join(w), w[0]


def _last(rng: random.Random) -> tuple[str, str]:
    w = _words(rng, 2, 6)
    return " ".join(w), w[-1]


def _max(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng, 3, 6)
    return " ".join(map(str, d)), str(max(d))


def _spell(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng, 1, 4)
    return " ".join(map(str, d)), " ".join(DIGIT_WORDS[i] for i in d)


TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Maker]] = {
    "reverse": (
        (
            "Reverse the order of these words.",
            "Write these words in reverse order.",
            "List the words from last to first.",
        ),
        (
            "Reverse the order of these words: {x}",
            "Write the words {x} in reverse order.",
            "List these words from last to first: {x}",
        ),
        _reverse,
    ),
    "sort": (
        (
            "Sort these numbers from smallest to largest.",
            "Put the numbers in increasing order.",
            "Arrange the numbers in ascending order.",
        ),
        (
            "Sort these numbers from smallest to largest: {x}",
            "Put the numbers {x} in increasing order.",
            "Arrange in ascending order: {x}",
        ),
        _sort,
    ),
    "add": (
        ("Add the two numbers.", "Compute the sum.", "What is the result of this addition?"),
        ("What is {x}?", "Compute {x}.", "Add the numbers: {x}"),
        _add,
    ),
    "uppercase": (
        (
            "Convert the text to uppercase.",
            "Write these words in capital letters.",
            "Rewrite the phrase in upper case.",
        ),
        ("Convert to uppercase: {x}", "Write {x} in capital letters.", "Rewrite the phrase in upper case: {x}"),
        _uppercase,
    ),
    "count": (
        ("How many words are there?", "Count the words in the list.", "Give the number of items in the list."),
        ("How many words are in this list: {x}", "Count the words: {x}", "Give the number of items in: {x}"),
        _count,
    ),
    "copy": (
        ("Repeat these words exactly.", "Copy the text.", "Write the same words again."),
        ("Repeat these words exactly: {x}", "Copy the text: {x}", "Write the same words again: {x}"),
        _copy,
    ),
    "first": (
        ("What is the first word?", "Give the first item of the list.", "Which word comes first?"),
        ("What is the first word in: {x}", "Give the first item of the list: {x}", "Which word comes first in {x}?"),
        _first,
    ),
    "last": (
        ("What is the last word?", "Give the last item of the list.", "Which word comes last?"),
        ("What is the last word in: {x}", "Give the last item of the list: {x}", "Which word comes last in {x}?"),
        _last,
    ),
    "max": (
        ("What is the largest number?", "Find the biggest number in the list.", "Which number is the greatest?"),
        ("What is the largest number in: {x}", "Find the biggest number: {x}", "Which number is the greatest in {x}?"),
        _max,
    ),
    "spell": (
        ("Write each digit as a word.", "Spell out the digits.", "Replace every number with its name."),
        ("Write each digit as a word: {x}", "Spell out the digits {x}.", "Replace every number with its name: {x}"),
        _spell,
    ),
}


def make_record(rng: random.Random, task: str | None = None) -> dict[str, str]:
    """One demo record: {"instruction", "input", "output", "task"}; half carry the data as `input`."""
    task = task or rng.choice(sorted(TASKS))
    with_input, inline, maker = TASKS[task]
    data, answer = maker(rng)
    if rng.random() < 0.5:
        return {"instruction": rng.choice(with_input), "input": data, "output": answer, "task": task}
    return {"instruction": rng.choice(inline).format(x=data), "input": "", "output": answer, "task": task}


def generate_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(n)]


def record_key(record: dict[str, str]) -> tuple[str, str]:
    """Two records are the same example when the model sees the same prompt."""
    return record["instruction"], record["input"]


# Relative share of each task in the training split (1 where not named); the held-out split stays uniform.
# Copy, reverse and sort are the tasks the demo model learns last (benchmarks/RESULTS.md, "Demo accuracy").
TRAIN_TASK_WEIGHTS: dict[str, float] = {"copy": 2.0, "reverse": 2.0, "sort": 3.0}


def demo_split(
    n_train: int = 20000, n_heldout: int = 500, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout): `n_heldout` distinct records, each task equally likely, then `n_train` records with
    tasks drawn by TRAIN_TASK_WEIGHTS, none of whose prompts is held out (train may repeat its own records;
    small tasks such as single-digit addition have few prompts)."""
    rng_held, rng_train = random.Random(2 * seed + 1), random.Random(2 * seed + 2)
    names = sorted(TASKS)
    weights = [TRAIN_TASK_WEIGHTS.get(t, 1.0) for t in names]
    heldout, held = [], set()
    while len(heldout) < n_heldout:
        r = make_record(rng_held)
        if record_key(r) not in held:
            held.add(record_key(r))
            heldout.append(r)
    train = []
    while len(train) < n_train:
        r = make_record(rng_train, rng_train.choices(names, weights)[0])
        if record_key(r) not in held:
            train.append(r)
    return train, heldout


def exact_match(record: dict[str, str], generated_text: str) -> bool:
    """Whether a generated response is the record's answer (surrounding whitespace ignored)."""
    return generated_text.strip() == record["output"]


# --- the demo tokenizer ----------------------------------------------------------------------------------


def closed_words() -> list[str]:
    """Every content word the task can put in an input or answer (each must be a single piece)."""
    return list(WORDS) + [w.upper() for w in WORDS] + list(DIGIT_WORDS)


def _template_pieces() -> list[str]:
    """The fixed text of Alpaca's two templates as five pieces, written as SentencePiece sees it (spaces as
    U+2581, the first one the dummy prefix). BPE would spend ~35 tokens of every ~50-token example on the
    template; as five pieces, a CPU run spends its compute on the task (examples shrink to ~18 tokens)."""
    texts = [
        "Below is an instruction that describes a task",
        ", paired with an input that provides further context",
        ". Write a response that appropriately completes the request.\n\n### Instruction:\n",
        "\n\n### Input:\n",
        "\n\n### Response:",
    ]
    return ["\u2581" * (i == 0) + t.replace(" ", "\u2581") for i, t in enumerate(texts)]


def _piece_words() -> list[str]:
    """Closed-list words forced to be single pieces, without the leading space mark, so that the space
    before a word stays a piece of its own. (BPE at 512 pieces spends its merges on the template and
    splits uppercase words into fragments.) Digits are single characters already (split_digits)."""
    return closed_words()


def tokenizer_corpus(seed: int = 0, n: int = 6000) -> list[str]:
    """Training texts: full prompt + response of demo records (newlines included: the trainer reads them
    from an iterator, not line by line), plus each closed-list word at the start and after a space."""
    texts = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in generate_records(n, seed=seed + 1000)]
    return texts + [f"{w} {w}" for w in closed_words() for _ in range(20)]


def make_tokenizer(out: str | Path, seed: int = 0) -> Path:
    """Train the demo SentencePiece model and write it to `out` (deterministic for a given seed)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed)),
        model_writer=model,
        vocab_size=DEMO_VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        byte_fallback=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[*_template_pieces(), "\n", *_piece_words()],
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out
