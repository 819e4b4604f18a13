"""Answer instructions with a checkpoint, through Stanford Alpaca's prompt template or a chat template.

    python -m c2a.generate --model DIR --prompt "Give three tips for staying healthy." [--input "..."]
    python -m c2a.generate --model DIR < instructions.txt     # one instruction per line, until EOF
    python -m c2a.generate --model DIR --template auto --prompt "..."   # the template DIR was trained with
    python -m c2a.generate --model BASE --adapter ADAPTER --prompt "..."  # a PEFT LoRA adapter, merged at load

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

from c2a.errors import USER_ERRORS, report
from c2a.inference import load_model, load_tokenizer, prompt_format, respond
from c2a.inference.arguments import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m c2a.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--model", required=True, help="HF or Meta checkpoint directory")
    ap.add_argument("--prompt", help="the instruction; without it, instructions are read from stdin, one per line")
    ap.add_argument("--input", default="", help="the optional Alpaca input (context) for the instruction(s)")
    add_model_arguments(ap)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ap.add_argument("--seed", type=int, help="seed for sampling (each instruction uses it afresh)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        tok = load_tokenizer(args.model, args.tokenizer)
        fmt = prompt_format(args.template, tok)  # a template error before the weights are read
        model = load_model(args.model, tok, args.device, args.dtype, args.adapter)
        options = dict(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, fmt=fmt
        )
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
        return report(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
