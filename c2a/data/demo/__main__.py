"""The bundled demo task from the command line: its records, and the demo SentencePiece model.

python -m c2a.data.demo --show N                 print N training records
python -m c2a.data.demo --make-tokenizer OUT     train the demo SentencePiece model and write it to OUT
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from c2a.data.demo import demo_split, make_tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2a.data.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-tokenizer", metavar="OUT", help="train the demo SentencePiece model and write it to OUT")
    ap.add_argument("--show", type=int, metavar="N", default=0, help="print N training records")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.make_tokenizer:
        path = make_tokenizer(args.make_tokenizer, seed=args.seed)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for r in demo_split(n_train=max(args.show, 1), n_heldout=0, seed=args.seed)[0][: args.show]:
        print(r)
    if not args.make_tokenizer and not args.show:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
