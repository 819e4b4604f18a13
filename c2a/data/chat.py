"""Chat data: records with `messages` ([{role, content}, ...]) rendered by a Jinja chat template, trained on the
assistant turns only.

Templates: the checkpoint's `chat_template` (tokenizer_config.json, as transformers' apply_chat_template
renders it: jinja2's sandbox with trim_blocks and lstrip_blocks, `messages`, `bos_token`, `eos_token`,
`add_generation_prompt`, `raise_exception`) or a built-in by name: `alpaca` (Stanford Alpaca's prompt per
user turn, the answer then EOS) or `llama2-chat` (Meta's [INST] format). `auto` is the checkpoint's
template when it has one, else `alpaca`.

Which characters are trained: for assistant message i, the template renders the conversation before it
with the generation prompt (P_i) and the conversation up to and including it (Q_i); the characters
Q_i[len(P_i):] are the assistant's turn, its end-of-turn marker included ("...<|eot_id|>" in Llama-3's
template, "... </s>" in Llama-2's). Both must be prefixes of the whole rendering, else the template does
not render turn by turn and the record is refused with the template's name.

Encoding: the rendering is cut at every turn boundary and at every special token's text (BOS, EOS, a
tokenizer.json's special added tokens such as <|start_header_id|>); special tokens become their ids. Text
that opens a document (first, or right after BOS) is encoded as Meta encodes a turn, with SentencePiece's
dummy prefix; any other text as a continuation (no prefix space). So no token straddles a boundary, the
ids decode back to exactly the rendered text (`decode` leaves out BOS and EOS, as for Alpaca), and the
`alpaca` built-in gives a single-turn conversation exactly the tokens and labels of the Alpaca record. Labels follow
the Alpaca convention: input_ids = tokens[:-1], labels = tokens[1:] with every target outside an assistant
turn set to -100. Over-length (`max_len` bounds len(input_ids)): "truncate" keeps the head (the first
max_len + 1 tokens: earlier turns are the later turns' context) and drops the example if no trained target
is left; "drop" drops it. Both are counted by the caller.

Generation (c2a.generate, c2a.eval with --template): an instruction becomes one user turn
(`instruction_messages`: the input, if any, after an empty line), rendered with the generation prompt and
encoded exactly as training encodes a rendering (`generation_prompt`); the model's turn ends at EOS or at
the template's end-of-turn token (`end_of_turn_ids`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from c2a.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# Stanford Alpaca's two prompts (c2a.data.alpaca), the user turn as the instruction; a system message, if
# any, as the Input. The answer follows "### Response:" directly and ends with EOS.
ALPACA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if system %}"
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{{ m['content'] }}\n\n### Input:\n{{ system }}\n\n### Response:"
    "{% else %}"
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{{ m['content'] }}\n\n### Response:"
    "{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% if not loop.last %}\n\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)

# Meta's Llama-2-chat format (llama/generation.py chat_completion): each user turn in [INST] ... [/INST],
# the system prompt in <<SYS>> inside the first one, each answer " {answer} " then EOS; BOS opens each turn.
LLAMA2_CHAT_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{{ bos_token }}[INST] "
    "{% if system is not none and loop.index0 == 1 %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# The released claude2-alpaca model's rule (its dataset.py, read 2026-12-06): the "### Input:" prompt whenever
# the *instruction* is non-empty, so an example without an input gets "### Input:" over an empty line; the
# no-input prompt only for an empty instruction. As ALPACA_TEMPLATE otherwise (a system message is the input).
ALPACA_RELEASED = "alpaca-claude2-released"
# The one difference from ALPACA_TEMPLATE: the with-input prompt is chosen by the instruction, not the input.
ALPACA_RELEASED_TEMPLATE = ALPACA_TEMPLATE.replace("{% if system %}", "{% if m['content'] != '' %}", 1)
assert ALPACA_RELEASED_TEMPLATE != ALPACA_TEMPLATE

BUILTIN_TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA_TEMPLATE,
    "llama2-chat": LLAMA2_CHAT_TEMPLATE,
    ALPACA_RELEASED: ALPACA_RELEASED_TEMPLATE,
}
TEMPLATE_CHOICES: tuple[str, ...] = ("auto", "tokenizer", *BUILTIN_TEMPLATES)


class ChatTemplateError(ValueError):
    """A template that cannot be used, or a conversation it cannot render; the message names the template."""


def resolve_template(name: str, tokenizer: Tokenizer) -> tuple[str, str]:
    """(label, Jinja source) for data.template `name`: auto, tokenizer (the checkpoint's chat_template), or a built-in."""
    if name not in TEMPLATE_CHOICES:
        raise ChatTemplateError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATE_CHOICES)}")
    if name in BUILTIN_TEMPLATES:
        return name, BUILTIN_TEMPLATES[name]
    if tokenizer.chat_template is not None:
        return f"chat_template of {tokenizer.chat_template_file}", tokenizer.chat_template
    if name == "tokenizer":
        directory = tokenizer.path.parent
        raise ChatTemplateError(
            f"{directory / 'tokenizer_config.json'} has no chat_template; name a built-in one "
            f"({', '.join(BUILTIN_TEMPLATES)}), or put the template in {directory / 'chat_template.jinja'}"
        )
    return "alpaca", ALPACA_TEMPLATE


def template_sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    # the environment transformers renders chat templates in (trim_blocks, lstrip_blocks, a sandbox)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from e


def render_chat(
    source: str, messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, add_generation_prompt: bool = False
) -> str:
    """The text of `messages` under the Jinja template `source`, as transformers' apply_chat_template renders it."""
    from jinja2 import TemplateError

    try:
        return _compiled(source).render(
            messages=list(messages),
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from e


def validate_messages(row: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """{"messages": [{"role", "content"}, ...]} as strings, or a ValueError saying what is wrong."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"field 'messages' must be a non-empty list of {{role, content}} objects, got {type(messages).__name__}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; valid: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise ValueError("no assistant message: nothing to train on")
    if any(not m["content"].strip() for m in assistant):
        raise ValueError("an assistant message is empty")
    return {"messages": out}


def assistant_spans(
    source: str, messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, label: str = "chat template"
) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, end) character spans of its assistant turns)."""
    full = render_chat(source, messages, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(source, messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_chat(source, messages[: i + 1], tokenizer)
        if not (upto.startswith(before) and full.startswith(upto)) or len(upto) == len(before):
            raise ChatTemplateError(
                f"{label} does not render turn by turn: the conversation up to message {i} (assistant) "
                "is not a prefix of the whole rendering, so its trained characters cannot be found"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def instruction_messages(instruction: str, input: str = "") -> list[dict[str, str]]:
    """One instruction as a conversation to answer: a user turn holding the instruction and, after an empty
    line, its input (as AlpacaEval folds an input into its instruction)."""
    return [{"role": "user", "content": instruction + (f"\n\n{input}" if input else "")}]


def generation_prompt(source: str, messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> list[int]:
    """Ids of `messages` and the assistant's generation prompt, encoded as training encodes a rendering: BOS
    only where the template writes bos_token (Llama-3's does; a second one is never added)."""
    return encode_text(render_chat(source, messages, tokenizer, add_generation_prompt=True), tokenizer, [])


END_OF_TURN_PROBE = "c2a-end-of-turn-probe"


def end_of_turn_ids(source: str, tokenizer: Tokenizer) -> list[int]:
    """The special token an assistant turn ends with under `source` (Llama-3's <|eot_id|>, ChatML's
    <|im_end|>, EOS for the built-ins), as a one-element list; empty if the turn ends in plain text. Found
    as the first special token after the answer in a rendered one-turn conversation: the token training
    taught the model to close its turn with (the trained span of `assistant_spans` ends with it)."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
    text = render_chat(source, messages, tokenizer)
    after = text.rfind(END_OF_TURN_PROBE)
    if after < 0:
        return []
    m = _special_pattern(tokenizer).search(text, after + len(END_OF_TURN_PROBE))
    return [tokenizer.special_tokens[m.group()]] if m else []


def _special_pattern(tokenizer: Tokenizer) -> re.Pattern[str]:
    # longest first, so "<|end_of_text|>" is not cut by a shorter token that is its prefix
    return re.compile("|".join(re.escape(t) for t in sorted(tokenizer.special_tokens, key=len, reverse=True)))


def encode_text(text: str, tokenizer: Tokenizer, before: list[int]) -> list[int]:
    """Ids of a piece of rendered template text that follows the ids `before`: special tokens' text as their
    ids, other text as a document start (after nothing or BOS) or a continuation (module docstring)."""
    ids: list[int] = []

    def add_text(piece: str) -> None:
        previous = ids[-1] if ids else before[-1] if before else None
        starts = previous is None or previous == tokenizer.bos_id
        ids.extend(tokenizer.encode(piece, bos=False) if starts else tokenizer.encode_continuation(piece))

    pos = 0
    for m in _special_pattern(tokenizer).finditer(text):
        if m.start() > pos:
            add_text(text[pos : m.start()])
        ids.append(tokenizer.special_tokens[m.group()])
        pos = m.end()
    if pos < len(text):
        add_text(text[pos:])
    return ids


def encode_chat(
    record: Mapping[str, Any], tokenizer: Tokenizer, source: str, label: str = "chat template"
) -> tuple[list[int], list[bool]]:
    """(tokens, trained) for a chat record: every token of the rendering, and whether it is an assistant turn's."""
    full, spans = assistant_spans(source, record["messages"], tokenizer, label)
    tokens: list[int] = []
    trained: list[bool] = []
    pos = 0
    for start, end in spans:
        for text, is_trained in ((full[pos:start], False), (full[start:end], True)):
            ids = encode_text(text, tokenizer, tokens)
            tokens += ids
            trained += [is_trained] * len(ids)
        pos = end
    ids = encode_text(full[pos:], tokenizer, tokens)
    return tokens + ids, trained + [False] * len(ids)
