"""How an instruction becomes prompt ids: Stanford Alpaca's template, or a chat template's rendering of one
user turn, and the token ids an answer stops at."""

from __future__ import annotations

from dataclasses import dataclass

from c2a.data import chat
from c2a.data.alpaca import format_prompt
from c2a.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptFormat:
    """How an instruction becomes prompt ids: Stanford Alpaca's prompt (`source` None) or a chat template's
    rendering of one user turn; `stop_ids`: EOS first, then the template's end-of-turn token if it is another."""

    label: str
    source: str | None
    stop_ids: tuple[int, ...]

    def encode(self, tok: Tokenizer, instruction: str, input: str = "") -> list[int]:
        if self.source is None:
            return tok.encode(format_prompt(instruction, input), bos=True)
        return chat.generation_prompt(self.source, chat.instruction_messages(instruction, input), tok)


def alpaca_format(tok: Tokenizer) -> PromptFormat:
    """Stanford Alpaca's prompt, as training encodes an Alpaca record, stopping at EOS."""
    return PromptFormat("alpaca", None, (tok.eos_id,))


def prompt_format(template: str, tok: Tokenizer) -> PromptFormat:
    """The PromptFormat of a --template name (chat.TEMPLATE_CHOICES), resolved with `tok` as training resolves
    data.template; a ChatTemplateError names an unknown name or a checkpoint without a chat template."""
    label, source = chat.resolve_template(template, tok)
    if source == chat.ALPACA_TEMPLATE:
        # Alpaca's own prompt: with an input, its "### Input:" variant, as an Alpaca record was trained
        return alpaca_format(tok)
    end_of_turn = [i for i in chat.end_of_turn_ids(source, tok) if i != tok.eos_id]
    return PromptFormat(label, source, (tok.eos_id, *end_of_turn))
