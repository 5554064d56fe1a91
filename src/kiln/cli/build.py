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
from typing import Any

from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli.options import profile_spec
from kiln.cli.run import make_inputs
from kiln.cli.progress import JsonLines, PhaseDisplay
from kiln.config import CALIBRATION_METHODS, DEVICES
from kiln.engine.calibration_data import calibration_batches
from kiln.engine.progress import phase
from kiln.errors import ConfigError
from kiln.frontend.tensorflow import is_saved_model
from kiln.runtime.accuracy import OutputAccuracy

REPORT_BATCHES = 8

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
        help="fp32 (strict, default), tf32, fp16, bf16, int8 or fp8 (int8/fp8 calibrate on "
        "--calibration-data unless the model carries QuantizeLinear/DequantizeLinear)",
    )
    parser.add_argument(
        "--layer-precision", action="append", default=[], metavar="NAME=fp32",
        help="keep layer NAME (as `kiln inspect` shows it) in fp32 under a reduced precision; "
        "repeatable",
    )
    calibration = parser.add_argument_group("int8 / fp8 calibration")
    calibration.add_argument(
        "--calibration-data", metavar="DIR",
        help="a directory of .npz files (one batch each, arrays named as the model's inputs; "
        ".npy files for a one-input model)",
    )
    calibration.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default="entropy",
        help="how observed activations become ranges (default: entropy)",
    )
    calibration.add_argument(
        "--calibration-percentile", type=float, default=99.99, metavar="P",
        help="for --calibration-method percentile: the percentile of |x| kept (99.99)",
    )
    calibration.add_argument(
        "--calibration-cache", metavar="PATH",
        help="calibrated ranges to reuse (written after calibrating; a later build needs no data)",
    )
    calibration.add_argument(
        "--calibration-batches", type=int, metavar="N", help="use at most N calibration batches",
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
        help="print each pass (node counts before and after, matches per rule) and, for a "
        "reduced precision, the engine's accuracy against the FP32 model in ONNX Runtime on the "
        "calibration data (else on random inputs)",
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
            layer_precisions=_layer_precisions(args.layer_precision), profiles=args.shapes,
            timing_cache=args.timing_cache, calibration_data=args.calibration_data,
            calibration_method=args.calibration_method,
            calibration_percentile=args.calibration_percentile,
            calibration_cache=args.calibration_cache, calibration_batches=args.calibration_batches,
            progress=progress,
        )
        with phase(progress, "write") as current:
            engine.save(args.output)
            current.detail = f"{Path(args.output).stat().st_size / 2**20:.1f} MiB"
    if args.report:
        Console().print(report_table(engine.build_report))
        if args.precision != "fp32" and not is_saved_model(args.model):
            Console().print(accuracy_table(engine.accuracy_report(_report_data(engine, args), args.model)))
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


def _report_data(engine: kiln.Engine, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Up to 8 calibration batches, or one batch of random inputs (seed 0)."""
    if args.calibration_data:
        return calibration_batches(args.calibration_data, engine.inputs, limit=REPORT_BATCHES)
    return [make_inputs(engine.inputs, [], "", 0, engine.profiles)]


def accuracy_table(outputs: list[OutputAccuracy]) -> Table:
    table = Table(title="accuracy against FP32 (ONNX Runtime)")
    for column in ("output", "samples", "max abs", "max rel", "cosine", "worst sample", "top-1"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for entry in outputs:
        top1 = "" if entry.top1_agreement is None else f"{entry.top1_agreement:.1%}"
        table.add_row(
            entry.name, str(entry.samples), f"{entry.max_abs:.3g}", f"{entry.max_rel:.3g}",
            f"{entry.cosine:.6f}", f"{entry.worst_sample_cosine:.6f}", top1,
        )
    return table


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
