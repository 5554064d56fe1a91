"""Entry point of the ``kiln`` command.

A :class:`~kiln.errors.KilnError` prints one line to stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kiln.cli import build, inspect, run
from kiln.errors import KilnError

COMMANDS = {"build": build, "run": run, "inspect": inspect}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kiln", description="Build and run fast inference engines.")
    top.add_argument("-v", "--verbose", action="store_true", help="log what kiln does")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.handler(args) or 0
    except KilnError as error:
        print(f"kiln {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
