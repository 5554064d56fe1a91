"""``kiln inspect ENGINE``: what an engine holds — signature, device, versions and layers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.engine import format as engine_format

HELP = "show an engine's inputs, outputs, target and layers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", help="engine file (.kiln)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": manifest["signature"]["inputs"],
        "outputs": manifest["signature"]["outputs"],
        "device": manifest["target"],
        "versions": {"kiln": manifest.get("kiln_version"), **manifest["versions"]},
        "precision": manifest["precision"],
        "opt_level": manifest.get("opt_level"),
        "model": manifest.get("model", {}),
        "build": manifest.get("build", {}),
        "layers": manifest["layers"],
    }


def main(args: argparse.Namespace) -> int:
    # Inspecting needs no device: the manifest is read without binding the plan.
    info = describe(engine_format.load(args.engine).manifest)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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
    layers = Table(title="layers (execution order)")
    for column in ("#", "name", "op", "sources", "precision", "choice"):
        layers.add_column(column)
    for index, layer in enumerate(info["layers"]):
        sources = ", ".join(layer["sources"]) if len(layer["sources"]) <= 3 else (
            f"{', '.join(layer['sources'][:3])} +{len(layer['sources']) - 3}"
        )
        layers.add_row(str(index), layer["name"], layer["op"], sources, layer["precision"], layer["choice"])
    console.print(layers)
    return 0
