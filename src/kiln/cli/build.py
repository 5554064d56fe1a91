"""``kiln build MODEL -o ENGINE``: build an engine file from an ONNX model, showing progress.

The build's phases (import, passes, lowering, choices, plan) and the writing of the file show as
progress bars on a terminal; ``--log-json`` prints their events as JSON lines instead, ``--quiet``
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli.options import profile_spec
from kiln.cli.progress import JsonLines, PhaseDisplay
from kiln.config import DEVICES
from kiln.engine.progress import phase
from kiln.errors import ConfigError
from kiln.frontend.tensorflow import is_saved_model

HELP = "build an engine from an ONNX model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model file, or a TensorFlow SavedModel directory")
    parser.add_argument("-o", "--output", required=True, help="engine file to write (.kiln)")
    parser.add_argument("--device", choices=DEVICES, help="target device (default: cuda if present)")
    parser.add_argument(
        "--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
        help="optimization level: 0 cleanup only, 3 default",
    )
    parser.add_argument(
        "--precision", default="fp32", metavar="P",
        help="fp32 (strict, default), tf32, fp16 or bf16",
    )
    parser.add_argument(
        "--layer-precision", action="append", default=[], metavar="NAME=fp32",
        help="keep layer NAME (as `kiln inspect` shows it) in fp32 under fp16/bf16; repeatable",
    )
    parser.add_argument(
        "--timing-cache", metavar="PATH",
        help="kernel timings to reuse and extend (a JSON file; shared across builds and models)",
    )
    parser.add_argument(
        "--shapes", action="append", default=[], type=profile_spec,
        metavar="NAME:MIN,OPT,MAX",
        help="an optimization profile: each input's min, opt and max shapes (e.g. ids:1x16,8x128,64x512; "
        "space-separated inputs; NAME:8x128 fixes one); repeat for more profiles",
    )
    parser.add_argument(
        "--report", action="store_true",
        help="print each pass: node counts before and after, and matches per rule",
    )
    parser.add_argument(
        "--debug-outputs", action="store_true",
        help="also output every layer's results (for `kiln compare --layerwise --engine`)",
    )
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    shown.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="also print each phase's summary as it ends, and kiln's log",
    )
    shown.add_argument(
        "--log-json", action="store_true",
        help="print each phase event as one JSON object per line on stdout, instead of progress bars",
    )


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with _renderer(args) as progress:
        build = kiln.from_tensorflow if is_saved_model(args.model) else kiln.build
        engine = build(
            args.model, device=args.device, opt_level=args.opt_level,
            debug_outputs=args.debug_outputs, precision=args.precision,
            layer_precisions=_layer_precisions(args.layer_precision), profiles=args.shapes, timing_cache=args.timing_cache,
            progress=progress,
        )
        with phase(progress, "write") as current:
            engine.save(args.output)
            current.detail = f"{Path(args.output).stat().st_size / 2**20:.1f} MiB"
    if args.report:
        Console().print(report_table(engine.build_report))
    if not args.quiet:
        Console(stderr=True).print(
            f"built [bold]{args.output}[/] for {engine.device.type}: {len(engine.layers)} layers "
            f"in {time.perf_counter() - start:.2f} s"
        )
    return 0


def _layer_precisions(entries: list[str]) -> dict[str, str]:
    pinned = {}
    for entry in entries:
        name, sep, precision = entry.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"--layer-precision takes NAME=PRECISION, not {entry!r}")
        pinned[name] = precision
    return pinned


def _renderer(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """A context giving the progress callback (None when quiet: the build reports to no one)."""
    if args.quiet:
        return contextlib.nullcontext()
    if args.log_json:
        return JsonLines()
    return PhaseDisplay(verbose=args.verbose)


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
