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
from kiln.cli.options import (
    add_calibration_arguments, add_layer_precision_argument, calibration_options, layer_precisions,
    profile_spec,
)
from kiln.cli.progress import JsonLines, PhaseDisplay
from kiln.config import DEVICES, AccuracyBudget
from kiln.engine.progress import phase
from kiln.frontend.tensorflow import is_saved_model
from kiln.precision_search import MANIFEST_KEY, describe_values, evaluation_batches
from kiln.runtime.accuracy import OutputAccuracy

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
        "--calibration-data unless the model carries QuantizeLinear/DequantizeLinear; fp16 keeps "
        "layers whose activations on it leave fp16's range in fp32), or best: the fastest that "
        "meets --accuracy-budget",
    )
    parser.add_argument(
        "--accuracy-budget", metavar="BUDGET",
        help='how close to FP32 (ONNX Runtime) the engine must stay, e.g. "cosine>=0.999" or '
        '"cosine>=0.999,top1>=0.99" (also max_abs<=X, max_rel<=X): the layers that lose the most '
        "stay fp32 until it holds; measured on --calibration-data, else on random inputs",
    )
    add_layer_precision_argument(parser)
    add_calibration_arguments(parser)
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
        "--no-fp16-fallback", dest="fp16_fallback", action="store_false",
        help="int8/fp8 on a GPU: quantize every layer the policy can, even those that run faster "
        "in fp16 (by default they stay in fp16 when that makes the engine faster)",
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
            accuracy_budget=args.accuracy_budget,
            layer_precisions=layer_precisions(args.layer_precision), profiles=args.shapes,
            timing_cache=args.timing_cache, calibration_data=args.calibration_data,
            fp16_fallback=args.fp16_fallback, progress=progress, **calibration_options(args),
        )
        with phase(progress, "write") as current:
            engine.save(args.output)
            current.detail = f"{Path(args.output).stat().st_size / 2**20:.1f} MiB"
    if args.report:
        Console().print(report_table(engine.build_report))
        reduced = args.precision != "fp32" or args.accuracy_budget is not None
        if reduced and not is_saved_model(args.model):
            Console().print(accuracy_table(engine.accuracy_report(_report_data(engine, args), args.model)))
    if not args.quiet:
        console = Console(stderr=True)
        console.print(
            f"built [bold]{args.output}[/] for {engine.device.type}: {len(engine.layers)} layers "
            f"in {time.perf_counter() - start:.2f} s"
        )
        if MANIFEST_KEY in engine.manifest:
            console.print(_budget_summary(engine.manifest[MANIFEST_KEY]), highlight=False, soft_wrap=True)
    return 0


def _budget_summary(record: dict[str, Any]) -> str:
    """``int8 meets cosine>=0.999 with conv2 in fp32: cosine 0.99994 (6 builds)``."""
    kept = f"with {', '.join(record['pinned'])} in fp32" if record["pinned"] else "as built"
    reached = describe_values(AccuracyBudget.parse(record["budget"]), record["values"])
    return f"{record['precision']} meets {record['budget']} {kept}: {reached} ({record['builds']} builds)"


def _renderer(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """A context giving the progress callback (None when quiet: the build reports to no one)."""
    if args.quiet:
        return contextlib.nullcontext()
    if args.log_json:
        return JsonLines()
    return PhaseDisplay(verbose=args.verbose)


def _report_data(engine: kiln.Engine, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The data an accuracy budget is measured on: up to 8 calibration batches, else 8 batches
    of random inputs (seed 0)."""
    return evaluation_batches(engine.inputs, engine.profiles, args.calibration_data)


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
