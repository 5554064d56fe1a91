"""``kiln compare MODEL --vs onnxruntime|torch|fp32``: does kiln compute what the model says?

kiln's engine (``--engine``, or one built from MODEL) and a reference run on the same inputs; each
output is compared (max abs/rel error, cosine similarity, within ``--atol``/``--rtol``). With
``--layerwise`` both sides expose every layer's results, matched by ONNX value name, and the first
layer in execution order whose result is out of tolerance is named with its ONNX source nodes.
Exits 1 when an output is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli.options import add_build_arguments, add_input_arguments, build_quietly, inputs_for
from kiln.cli.runners import KilnRunner, OnnxRuntimeRunner, Runner, TorchRunner, load_torch_module
from kiln.runtime.accuracy import Agreement, agreement
from kiln.errors import BuildError
from kiln.frontend.onnx import read_onnx

HELP = "compare kiln's outputs with ONNX Runtime, PyTorch or an fp32 build, layer by layer if asked"
REFERENCES = ("onnxruntime", "torch", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model")
    parser.add_argument("--engine", help="engine to check (default: build one from MODEL)")
    parser.add_argument(
        "--vs", required=True, choices=REFERENCES,
        help="reference: ONNX Runtime, the PyTorch module (--torch-module), or kiln at fp32, "
        "optimization level 0",
    )
    parser.add_argument(
        "--torch-module", metavar="module.path:factory",
        help="for --vs torch: a callable returning the nn.Module, called with the inputs "
        "positionally in the model's input order",
    )
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (1e-5)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (1e-5)")
    parser.add_argument(
        "--layerwise", action="store_true",
        help="compare every layer's outputs and name the first that diverges",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_input_arguments(parser)
    add_build_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.vs == "torch" and not args.torch_module:
        args.usage_error("--vs torch needs --torch-module module.path:factory")
    if args.vs == "torch" and args.layerwise:
        args.usage_error("--layerwise matches ONNX value names: use --vs onnxruntime or fp32")
    model = read_onnx(args.model)
    engine = _engine(args)
    feed = inputs_for(engine, args)
    reference = _reference(args, model, engine)
    ours = engine.run(feed)
    theirs = reference.infer(feed)

    outputs = []
    for output in model.graph.output:
        name = output.name
        result = agreement(ours[name], theirs[name], args.atol, args.rtol) if (
            name in ours and name in theirs
        ) else Agreement(False, float("inf"), float("inf"), 0.0, "missing on one side")
        outputs.append({"name": name, **result.to_json()})
    report = {
        "reference": reference.name if args.vs != "fp32" else "kiln fp32 opt level 0",
        "atol": args.atol,
        "rtol": args.rtol,
        "outputs": outputs,
        "passed": all(entry["passed"] for entry in outputs),
        "first_divergent": _first_divergent(engine, ours, theirs, args) if args.layerwise else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, args)
    return 0 if report["passed"] else 1


def _engine(args: argparse.Namespace) -> kiln.Engine:
    if args.engine is None:
        return build_quietly(args.model, args, debug_outputs=args.layerwise)
    engine = kiln.load(args.engine, device=args.device)
    if args.layerwise and not engine.manifest.get("debug_outputs"):
        raise BuildError(
            f"{args.engine} does not expose its layers' outputs; rebuild it with "
            f"`kiln build {args.model} --debug-outputs`, or leave out --engine"
        )
    return engine


def _reference(args: argparse.Namespace, model: Any, engine: kiln.Engine) -> Runner:
    device = engine.device.type
    if args.vs == "onnxruntime":
        return OnnxRuntimeRunner(model, device, intermediate_outputs=args.layerwise)
    if args.vs == "torch":
        return TorchRunner(
            load_torch_module(args.torch_module), device,
            [info.name for info in engine.inputs], [output.name for output in model.graph.output],
        )
    fp32 = kiln.build(model, device=device, opt_level=0, debug_outputs=args.layerwise)
    return KilnRunner(fp32)


def _first_divergent(
    engine: kiln.Engine, ours: dict[str, Any], theirs: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any] | None:
    """The first layer, in execution order, with an output both sides have that disagrees."""
    steps = engine.manifest["plan"]["steps"]
    for layer, step in zip(engine.layers, steps):
        for tensor in step["outputs"]:
            if tensor not in ours or tensor not in theirs:
                continue
            result = agreement(ours[tensor], theirs[tensor], args.atol, args.rtol)
            if not result.passed:
                return {
                    "layer": layer["name"],
                    "op": layer["op"],
                    "sources": layer["sources"],
                    "tensor": tensor,
                    "error": result.to_json(),
                }
    return None


def _print(report: dict[str, Any], args: argparse.Namespace) -> None:
    console = Console()
    table = Table(title=f"kiln vs {report['reference']} (atol {args.atol:g}, rtol {args.rtol:g})")
    for column in ("output", "max abs error", "max rel error", "cosine", ""):
        table.add_column(column, justify="left" if column in ("output", "") else "right")
    for entry in report["outputs"]:
        status = "[green]ok[/]" if entry["passed"] else f"[red]FAIL[/] {entry.get('note', '')}"
        table.add_row(
            entry["name"], f"{entry['max_abs']:.3g}", f"{entry['max_rel']:.3g}",
            f"{entry['cosine']:.6f}", status,
        )
    console.print(table)
    if args.layerwise:
        divergent = report["first_divergent"]
        if divergent is None:
            console.print("every layer agrees within tolerance")
        else:
            error = divergent["error"]
            console.print(
                f"first divergent layer: [bold]{divergent['layer']}[/] ({divergent['op']}), from "
                f"ONNX node(s) {', '.join(divergent['sources'])}: tensor {divergent['tensor']!r} "
                f"max abs error {error['max_abs']:.3g}, cosine {error['cosine']:.6f}"
            )
    console.print("[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]")
