"""Convert a checkpoint between Meta's layout and HF safetensors.

    python -m c2a.model.convert SRC DST [--to hf|meta] [--dtype bf16|fp16|fp32] [--merge-adapter ADAPTER]

SRC is an HF directory (config.json + safetensors) or a Meta directory (params.json + consolidated.NN
shards, any model-parallel count). DST is written in the other format unless --to says otherwise: an HF
directory, or params.json + consolidated.00.safetensors with Meta's names. Tensors stream one at a time.
--merge-adapter ADAPTER (a PEFT LoRA adapter made for SRC) writes SRC with W + s·B·A merged (fp32 sums,
stored in SRC's dtype or --dtype), in SRC's format unless --to says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from c2a.config import DTYPES
from c2a.data.tokenizer import export_tokenizer, find_tokenizer
from c2a.errors import USER_ERRORS, report
from c2a.model.adapter import merged_tensors, read_adapter
from c2a.model.weights import DEFAULT_SHARD_BYTES, CheckpointReader, save_hf, save_meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m c2a.model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF or Meta checkpoint directory")
    parser.add_argument("dst", help="output directory (must not exist or be empty)")
    parser.add_argument("--to", choices=("hf", "meta"), help="output format (default: the other one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast tensors (default: as stored)")
    parser.add_argument("--merge-adapter", metavar="ADAPTER", help="a PEFT LoRA adapter directory to merge into SRC")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3, help="HF shard size limit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        reader = CheckpointReader(args.src)
        other = "meta" if reader.format == "hf" else "hf"
        to = args.to or (reader.format if args.merge_adapter else other)  # a merge keeps SRC's format
        dtype = DTYPES.get(args.dtype)
        tensors = reader.items()
        if args.merge_adapter:  # checked against SRC's config before a weight is read
            tensors = merged_tensors(tensors, *read_adapter(args.merge_adapter, reader.config))
        tensors = ((n, t.to(dtype) if dtype else t) for n, t in tensors)
        if to == "hf":
            save_hf(reader.config, tensors, args.dst, int(args.max_shard_gb * 1024**3))
        else:
            save_meta(reader.config, tensors, args.dst)
        # so the converted directory is usable on its own: tokenizer, its config files, the chat template
        copied = export_tokenizer(args.src, args.dst) if find_tokenizer(args.src) else []
    except USER_ERRORS as e:
        return report(e)
    logging.info(
        "wrote %s checkpoint of %s (%s) to %s%s",
        to,
        args.src,
        reader.format,
        Path(args.dst),
        f" with {', '.join(copied)}" if copied else " (no tokenizer files in the source to copy)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
