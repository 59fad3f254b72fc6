"""``python -m bench <command>``: the benchmark entry point.

Minimal dispatcher created with ``bench/speed.py`` (issue 7); the benchmark-harness
owner extends it with the other commands.
"""

from __future__ import annotations

import sys

COMMANDS = {"speed": "bench.speed"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
