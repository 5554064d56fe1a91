"""``kiln build MODEL -o ENGINE``: build an engine file from an ONNX model."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

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


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    engine = kiln.build(args.model, device=args.device, opt_level=args.opt_level)
    engine.save(args.output)
    Console(stderr=True).print(
        f"built [bold]{args.output}[/] for {engine.device.type}: {len(engine.layers)} layers "
        f"in {time.perf_counter() - start:.2f} s"
    )
    return 0
