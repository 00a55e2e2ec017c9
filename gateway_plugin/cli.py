"""The `creditgate` command: one entry point; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from creditservice import cli as authority_cli

    authority_cli.register(sub)
    try:
        from admission import cli as admission_cli
    except ImportError:  # pragma: no cover - during bootstrap only
        pass
    else:
        admission_cli.register(sub)
    try:
        from gateway_plugin import commands as gateway_cli
    except ImportError:  # pragma: no cover - during bootstrap only
        pass
    else:
        gateway_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
