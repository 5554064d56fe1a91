"""``kiln build MODEL -o ENGINE``: build an engine file from an ONNX model."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

import kiln
from kiln.config import DEVICES

HELP = "build an engine from an ONNX model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("-o", "--output", required=True, help="engine file to write (.kiln)")
    parser.add_argument("--device", choices=DEVICES, help="target device (default: cuda if present)")
    parser.add_argument(
        "--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
        help="optimization level: 0 cleanup only, 3 default",
    )
    parser.add_argument(
        "--report", action="store_true",
        help="print each pass: node counts before and after, and matches per rule",
    )


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    engine = kiln.build(args.model, device=args.device, opt_level=args.opt_level)
    engine.save(args.output)
    if args.report:
        Console().print(report_table(engine.build_report))
    Console(stderr=True).print(
        f"built [bold]{args.output}[/] for {engine.device.type}: {len(engine.layers)} layers "
        f"in {time.perf_counter() - start:.2f} s"
    )
    return 0


def report_table(passes: list[dict]) -> Table:
    table = Table(title="optimization passes")
    for column in ("pass", "nodes before", "nodes after", "matches", "ms"):
        table.add_column(column, justify="right" if column in ("nodes before", "nodes after", "ms") else "left")
    for record in passes:
        matches = ", ".join(f"{rule} ×{count}" for rule, count in record["changes"].items())
        table.add_row(
            record["name"], str(record["nodes_before"]), str(record["nodes_after"]), matches,
            f"{record['seconds'] * 1e3:.1f}",
        )
    return table
