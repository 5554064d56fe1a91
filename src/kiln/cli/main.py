"""Entry point of the ``kiln`` command.

A :class:`~kiln.errors.KilnError` prints one line to stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kiln.cli import bench, build, compare, debug, inspect, run, serve
from kiln.errors import KilnError

COMMANDS = {
    "build": build, "run": run, "bench": bench, "compare": compare, "inspect": inspect,
    "debug": debug, "serve": serve,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kiln", description="Build and run fast inference engines.")
    top.add_argument("-v", "--verbose", action="store_true", help="log what kiln does")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        # usage_error: for a handler's own checks of argument combinations (exits 2).
        sub.set_defaults(handler=module.main, usage_error=sub.error)
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
    except BrokenPipeError:
        # The reader of stdout left (`kiln build --log-json | head`): stop quietly, and keep
        # Python from failing again as it flushes stdout on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
