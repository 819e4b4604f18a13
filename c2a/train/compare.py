"""How two training configs differ, and what each difference changes.

    python -m c2a.train.compare A.toml B.toml

For example, the card's recipe against the training the released model went through:

    python -m c2a.train.compare configs/claude2-alpaca-13b.toml configs/claude2-alpaca-13b-as-released.toml

Each file is read as `--config` reads it (keys it leaves out take their defaults).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from c2a.config_diff import config_diff, format_diff
from c2a.errors import USER_ERRORS, report
from c2a.options import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2a.train.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="a training config (TOML)")
    ap.add_argument("b", help="another training config (TOML)")
    args = ap.parse_args(argv)
    try:
        a, b = parse_args(["--config", args.a]), parse_args(["--config", args.b])
    except USER_ERRORS as e:
        return report(e)
    print(format_diff(config_diff(a, b), args.a, args.b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
