"""The `creditgate` command: one entry point; each package registers its own subcommands.

creditservice.cli: authority, wallet, quota, key, export, import; admission.cli: flusher;
gateway_plugin.commands: gateway, demo.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from admission import cli as admission_cli
from creditservice import cli as authority_cli
from gateway_plugin import commands as gateway_cli


def build_parser() -> argparse.ArgumentParser:
    # Every subcommand's parser is of this class too (argparse makes them of their parent's):
    # a usage error is one line on stderr, exit 2, whichever command it is.
    parser = authority_cli.OneLineParser(
        prog="creditgate",
        description="Admission plugin for aiohttp gateways, its flusher and its credit authority.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    authority_cli.register(sub)
    admission_cli.register(sub)
    gateway_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
