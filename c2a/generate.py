"""Answer instructions with a checkpoint, through Stanford Alpaca's prompt template.

    python -m c2a.generate --model DIR --prompt "Give three tips for staying healthy." [--input "..."]
    python -m c2a.generate --model DIR < instructions.txt     # one instruction per line, until EOF

DIR is an HF or Meta checkpoint directory (what `c2a.model.load_pretrained` reads, e.g. a run's
out_dir/final); its tokenizer.model is used unless --tokenizer names another. The instruction (and
--input, if given) is put into Alpaca's template exactly as in training (`c2a.data.format_prompt`), the
prompt is encoded with BOS, and the model continues it until EOS or --max-new-tokens. Greedy by default;
--temperature > 0 samples (nucleus sampling with --top-p), reproducibly with --seed. The response alone
is printed; in the line-by-line mode each response is followed by an empty line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from c2a.data import DataError, Tokenizer, format_prompt
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


def load_model_and_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None, device: str | None = None,
                             dtype: str = "auto") -> tuple[Llama, Tokenizer]:  # fmt: skip
    """The checkpoint in eval mode on `device` (default: CUDA if present, else CPU) and its tokenizer.
    `dtype` "auto" is bf16 on CUDA and fp32 on CPU."""
    CheckpointReader(model_dir)  # validates the directory (files, names, shapes) before anything is loaded
    tok = Tokenizer(resolve_tokenizer(model_dir, tokenizer))
    device, torch_dtype = resolve_device(device, dtype)
    model = load_pretrained(model_dir, dtype=torch_dtype, device=device).eval()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model in {model_dir} has vocab_size "
                         f"{model.cfg.vocab_size}: they do not belong together")  # fmt: skip
    return model, tok


def respond(model: Llama, tok: Tokenizer, instruction: str, input: str = "", *, max_new_tokens: int = 256,  # noqa: A002
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:  # fmt: skip
    """The model's response to one Alpaca instruction (the text after "### Response:", EOS dropped)."""
    prompt = tok.encode(format_prompt(instruction, input), bos=True)
    new = generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=(tok.eos_id,), seed=seed,
                   vocab_size=tok.vocab_size)
    if new and new[-1] == tok.eos_id:
        new = new[:-1]
    return tok.decode_continuation(prompt, new)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m c2a.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--model", required=True, help="HF or Meta checkpoint directory")
    ap.add_argument("--prompt", help="the instruction; without it, instructions are read from stdin, one per line")
    ap.add_argument("--input", default="", help="the optional Alpaca input (context) for the instruction(s)")
    ap.add_argument("--tokenizer", help="SentencePiece tokenizer.model or HF tokenizer.json (default: DIR/tokenizer.model, else DIR/tokenizer.json)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ap.add_argument("--seed", type=int, help="seed for sampling (each instruction uses it afresh)")
    add_device_arguments(ap)
    return ap


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
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
