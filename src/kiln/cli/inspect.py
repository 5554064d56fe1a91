"""``kiln inspect ENGINE``: what an engine holds — signature, device, versions and layers.

With ``--profile`` it also runs the engine and times each layer on the device (median over the
runs; :mod:`kiln.runtime.layer_times`), showing each one's time and share of the whole; ``--plot`` draws that as a bar chart (PNG or HTML).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli.options import add_input_arguments, inputs_for
from kiln.cli.plot import plot_profile, top_layers
from kiln.engine import format as engine_format
from kiln.runtime.layer_times import layer_times

HELP = "show an engine's inputs, outputs, target and layers; profile its layers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", help="engine file (.kiln)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    profiling = parser.add_argument_group("profiling")
    profiling.add_argument(
        "--profile", action="store_true", help="run the engine and time each layer"
    )
    profiling.add_argument(
        "--plot", type=Path, metavar="FILE.png|FILE.html",
        help="draw the profile as a bar chart (implies --profile)",
    )
    profiling.add_argument(
        "--iterations", type=int, default=20, metavar="N", help="timed runs (20)"
    )
    profiling.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed runs first (5)")
    profiling.add_argument(
        "--top", type=int, default=20, metavar="N",
        help="show the N slowest layers, the rest as 'other' (20)",
    )
    profiling.add_argument("--device", choices=("cpu", "cuda"), help="device to load the engine on")
    add_input_arguments(parser)


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": manifest["signature"]["inputs"],
        "outputs": manifest["signature"]["outputs"],
        "profiles": manifest.get("profiles", []),  # input -> {"min", "opt", "max"} shapes
        "device": manifest["target"],
        "versions": {"kiln": manifest.get("kiln_version"), **manifest["versions"]},
        "precision": manifest["precision"],
        "opt_level": manifest.get("opt_level"),
        "model": manifest.get("model", {}),
        "build": manifest.get("build", {}),
        "layers": manifest["layers"],
        "custom_ops": manifest.get("custom_ops", []),  # to register (kiln.custom_op) before loading
        "memory": _memory_summary(manifest.get("memory")),  # None for engines built without a plan
    }


def _memory_summary(memory: dict[str, Any] | None) -> dict[str, int] | None:
    """The static memory plan in brief: arena against the sum of the activations it holds."""
    if memory is None:
        return None
    return {
        "arena_bytes": memory["arena_bytes"],
        "activation_bytes": memory["activation_bytes"],
        "activations": len(memory["values"]),
        "dynamic_values": len(memory["dynamic"]),
    }


def profile(engine: kiln.Engine, feed: dict[str, Any], iterations: int, warmup: int) -> dict[str, Any]:
    """Per layer, in execution order: median time over ``iterations`` runs and share of the total."""
    medians = [seconds * 1e3 for seconds in layer_times(engine, feed, iterations, warmup)]
    total = sum(medians)
    layers = [
        {
            "index": index,
            "name": layer["name"],
            "op": layer["op"],
            "precision": layer["precision"],
            "choice": layer["choice"],
            "ms": round(ms, 6),
            "share": round(ms / total, 6) if total > 0 else 0.0,
        }
        for index, (layer, ms) in enumerate(zip(engine.layers, medians))
    ]
    return {
        "device": engine.device.type,
        "iterations": max(iterations, 1),
        "inputs": {name: list(getattr(value, "shape", ())) for name, value in feed.items()},
        "total_ms": round(total, 6),
        "layers": layers,
    }


def main(args: argparse.Namespace) -> int:
    if args.profile or args.plot:
        engine = kiln.load(args.engine, device=args.device)
        info = describe(engine.manifest)
        info["profile"] = profile(engine, inputs_for(engine, args), args.iterations, args.warmup)
        if args.plot:
            result = info["profile"]
            plot_profile(result["layers"], args.plot, _plot_title(args.engine, result), args.top)
    else:
        # Inspecting alone needs no device: the manifest is read without binding the plan.
        info = describe(engine_format.load(args.engine).manifest)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print(args, info)
    return 0


def _plot_title(engine: str, result: dict[str, Any]) -> str:
    inputs = ", ".join(f"{n}[{'x'.join(map(str, s))}]" for n, s in result["inputs"].items())
    return (
        f"{Path(engine).name} on {result['device']}, {inputs}: {result['total_ms']:.3f} ms over "
        f"{len(result['layers'])} layers (median of {result['iterations']} runs)"
    )


def _print(args: argparse.Namespace, info: dict[str, Any]) -> None:
    console = Console()
    target = info["device"]
    console.print(
        f"[bold]{args.engine}[/]: {target['device']}"
        + (f" ({target['name']}, sm {target['compute_capability']})" if "name" in target else "")
        + f", precision {info['precision']}, opt level {info['opt_level']}, "
        f"{len(info['layers'])} layers, kiln {info['versions']['kiln']}, torch {info['versions']['torch']}"
    )
    signature = Table(title="signature")
    for column in ("", "name", "dtype", "shape"):
        signature.add_column(column)
    for role in ("inputs", "outputs"):
        for entry in info[role]:
            shape = "?" if entry["shape"] is None else "x".join(
                "?" if d is None else str(d) for d in entry["shape"]
            )
            signature.add_row(role[:-1], entry["name"], str(entry["dtype"]), shape)
    console.print(signature)
    if info["profiles"]:
        console.print(_profiles_table(info["profiles"]))
    if info.get("memory"):
        console.print(_memory_line(info["memory"]), soft_wrap=True)  # one line, for grep
    layers = Table(title="layers (execution order)")
    for column in ("#", "name", "op", "sources", "precision", "choice"):
        layers.add_column(column)
    for index, layer in enumerate(info["layers"]):
        sources = ", ".join(layer["sources"]) if len(layer["sources"]) <= 3 else (
            f"{', '.join(layer['sources'][:3])} +{len(layer['sources']) - 3}"
        )
        layers.add_row(str(index), layer["name"], layer["op"], sources, layer["precision"], layer["choice"])
    console.print(layers)
    if "profile" in info:
        console.print(_profile_table(info["profile"], args.top))
    if args.plot:
        console.print(f"plot written to {args.plot}")


def _profiles_table(profiles: list[dict[str, Any]]) -> Table:
    table = Table(title="optimization profiles (inputs must fit one)")
    for column in ("profile", "input", "min", "opt", "max"):
        table.add_column(column)
    for index, profile in enumerate(profiles):
        for name, ranges in profile.items():
            shapes = ["x".join(map(str, ranges[point])) for point in ("min", "opt", "max")]
            table.add_row(str(index), name, *shapes)
    return table


def _profile_table(result: dict[str, Any], top: int) -> Table:
    table = Table(title=_profile_title(result))
    for column in ("#", "layer", "op", "precision", "ms", "share", ""):
        table.add_column(column, justify="right" if column in ("#", "ms", "share") else "left")
    for row in top_layers(result["layers"], top):
        bar = "█" * max(1, round(row["share"] * 30)) if row["share"] > 0 else ""
        table.add_row(
            str(row.get("index", "")), row["name"], row["op"], row["precision"],
            f"{row['ms']:.4f}", f"{row['share']:.1%}", bar,
        )
    return table


def _profile_title(result: dict[str, Any]) -> str:
    return (
        f"layer profile on {result['device']}: {result['total_ms']:.3f} ms in all, "
        f"median of {result['iterations']} runs"
    )


def _memory_line(memory: dict[str, int]) -> str:
    arena, total = memory["arena_bytes"], memory["activation_bytes"]
    reuse = f" ({total / arena:.1f}x reuse)" if arena else ""
    return (
        f"memory: arena {_bytes(arena)} for {memory['activations']} activations totalling "
        f"{_bytes(total)}{reuse}, {memory['dynamic_values']} dynamic"
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
