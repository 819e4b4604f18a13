"""Answer instructions with a checkpoint, through Stanford Alpaca's prompt template or a chat template.

    python -m c2a.generate --model DIR --prompt "Give three tips for staying healthy." [--input "..."]
    python -m c2a.generate --model DIR < instructions.txt     # one instruction per line, until EOF
    python -m c2a.generate --model DIR --template auto --prompt "..."   # the template DIR was trained with

DIR is an HF or Meta checkpoint directory (what `c2a.model.load_pretrained` reads, e.g. a run's
out_dir/final); its tokenizer.model is used unless --tokenizer names another. Greedy by default;
--temperature > 0 samples (nucleus sampling with --top-p), reproducibly with --seed. The response alone
is printed; in the line-by-line mode each response is followed by an empty line.

--template (as the trainer's data.template) says how an instruction becomes a prompt:
  alpaca (default)  Stanford Alpaca's template exactly as in training (`c2a.data.format_prompt`), encoded
                    with BOS; the model continues it until EOS or --max-new-tokens;
  tokenizer         the checkpoint's chat template: its chat_template.jinja, else tokenizer_config.json's
                    chat_template (the trainer writes final/chat_template.jinja: the template the run
                    trained with);
  auto              the checkpoint's chat template if it has one, else alpaca;
  llama2-chat       Meta's [INST] format (c2a.data.chat).
Under a chat template the instruction (and --input after an empty line) is one user turn, rendered with
the generation prompt and encoded as training encodes a rendering (BOS only where the template writes
it); generation stops at EOS or at the template's end-of-turn token (Llama-3's <|eot_id|>). A chat
template that is Alpaca's (the trainer's export of an Alpaca run) is used as --template alpaca is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from c2a.data import DataError, Tokenizer, format_prompt
from c2a.data import chat
from c2a.data.tokenizer import find_tokenizer
from c2a.model import Llama, load_pretrained
from c2a.model.generate import generate
from c2a.model.weights import CheckpointError, CheckpointReader

# Errors whose message says all a user needs: printed as "error: ..." without a traceback.
USER_ERRORS = (CheckpointError, DataError, FileNotFoundError, ValueError)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_tokenizer(model_dir: str | Path, tokenizer: str | Path | None) -> Path:
    path = Path(tokenizer) if tokenizer else find_tokenizer(model_dir) or Path(model_dir) / "tokenizer.model"
    if not path.is_file():
        hint = "" if tokenizer else "; pass --tokenizer PATH (Llama-2's tokenizer.model for Llama-2 weights, or a tokenizer.json)"
        raise FileNotFoundError(f"tokenizer not found: {path}{hint}")
    return path


def resolve_device(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype: CUDA if present, else CPU; "auto" is bf16 on CUDA and fp32 on CPU."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return resolved, DTYPES[dtype]


def load_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None) -> Tokenizer:
    """The checkpoint's tokenizer (or `tokenizer`), after the directory is validated (files, names, shapes)."""
    CheckpointReader(model_dir)
    return Tokenizer(resolve_tokenizer(model_dir, tokenizer))


def load_model(model_dir: str | Path, tok: Tokenizer, device: str | None = None, dtype: str = "auto") -> Llama:
    """The checkpoint in eval mode on `device` (default: CUDA if present, else CPU); `dtype` "auto" is bf16 on
    CUDA and fp32 on CPU."""
    device, torch_dtype = resolve_device(device, dtype)
    model = load_pretrained(model_dir, dtype=torch_dtype, device=device).eval()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model in {model_dir} has vocab_size "
                         f"{model.cfg.vocab_size}: they do not belong together")  # fmt: skip
    return model


def load_model_and_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None, device: str | None = None,
                             dtype: str = "auto") -> tuple[Llama, Tokenizer]:  # fmt: skip
    """`load_model` and `load_tokenizer` together."""
    tok = load_tokenizer(model_dir, tokenizer)
    return load_model(model_dir, tok, device, dtype), tok


@dataclass(frozen=True)
class PromptFormat:
    """How an instruction becomes prompt ids: Stanford Alpaca's prompt (`source` None) or a chat template's
    rendering of one user turn; `stop_ids`: EOS first, then the template's end-of-turn token if it is another."""

    label: str
    source: str | None
    stop_ids: tuple[int, ...]

    def encode(self, tok: Tokenizer, instruction: str, input: str = "") -> list[int]:  # noqa: A002
        if self.source is None:
            return tok.encode(format_prompt(instruction, input), bos=True)
        return chat.generation_prompt(self.source, chat.instruction_messages(instruction, input), tok)


def prompt_format(template: str, tok: Tokenizer) -> PromptFormat:
    """The PromptFormat of a --template name (chat.TEMPLATE_CHOICES), resolved with `tok` as training resolves
    data.template; a ChatTemplateError names an unknown name or a checkpoint without a chat template."""
    label, source = chat.resolve_template(template, tok)
    if source == chat.ALPACA_TEMPLATE:
        # Alpaca's own prompt: with an input, its "### Input:" variant, as an Alpaca record was trained
        return PromptFormat("alpaca", None, (tok.eos_id,))
    end_of_turn = [i for i in chat.end_of_turn_ids(source, tok) if i != tok.eos_id]
    return PromptFormat(label, source, (tok.eos_id, *end_of_turn))


def respond(model: Llama, tok: Tokenizer, instruction: str, input: str = "", *, max_new_tokens: int = 256,  # noqa: A002
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, fmt: PromptFormat | None = None) -> str:  # fmt: skip
    """The model's response to one instruction (Alpaca's prompt unless `fmt` says otherwise), its stop token dropped."""
    fmt = fmt or PromptFormat("alpaca", None, (tok.eos_id,))
    prompt = fmt.encode(tok, instruction, input)
    new = generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=fmt.stop_ids, seed=seed,
                   vocab_size=tok.vocab_size)
    if new and new[-1] in fmt.stop_ids:
        new = new[:-1]
    return tok.decode_continuation(prompt, new)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m c2a.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--model", required=True, help="HF or Meta checkpoint directory")
    ap.add_argument("--prompt", help="the instruction; without it, instructions are read from stdin, one per line")
    ap.add_argument("--input", default="", help="the optional Alpaca input (context) for the instruction(s)")
    add_template_argument(ap)
    ap.add_argument("--tokenizer", help="SentencePiece tokenizer.model or HF tokenizer.json (default: DIR/tokenizer.model, else DIR/tokenizer.json)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ap.add_argument("--seed", type=int, help="seed for sampling (each instruction uses it afresh)")
    add_device_arguments(ap)
    return ap


def add_template_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--template", default="alpaca", choices=chat.TEMPLATE_CHOICES,
                    help="prompt format: alpaca (default), auto (the checkpoint's chat template, else alpaca), tokenizer "
                         "(the checkpoint's chat template) or llama2-chat")  # fmt: skip


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        tok = load_tokenizer(args.model, args.tokenizer)
        fmt = prompt_format(args.template, tok)  # a template error before the weights are read
        model = load_model(args.model, tok, args.device, args.dtype)
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, fmt=fmt)
        if args.prompt is not None:
            print(respond(model, tok, args.prompt, args.input, **options), flush=True)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"{args.model}: type an instruction and press Enter (Ctrl-D to quit)", file=sys.stderr)
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # EOF
                return 0
            instruction = line.rstrip("\r\n")
            if instruction.strip():
                print(respond(model, tok, instruction, args.input, **options) + "\n", flush=True)
    except USER_ERRORS as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
