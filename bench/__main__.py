"""``python -m bench <command>``: run, summary, plot, sweep, recommend, claims, speed.

``speed`` (issue 7, ``bench/speed.py``) keeps its own argument parser: it is handed the
remaining arguments untouched.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# Commands whose module parses its own arguments: name -> module with main(argv) -> int.
DELEGATED = {"speed": ".speed"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return int(importlib.import_module(DELEGATED[argv[0]], __package__).main(argv[1:]))
    from embcomp.exceptions import EmbcompError

    from .cli import build_parser

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EmbcompError as exc:
        print(f"bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
