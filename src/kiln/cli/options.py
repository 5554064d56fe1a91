"""Argument groups the tools share, and what they turn into: inputs, an engine, a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

import kiln
from kiln.cli.run import make_inputs
from kiln.config import DEVICES
from kiln.runtime import TensorInfo


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs (random ones by default, as `kiln run` makes them)")
    group.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input's values"
    )
    group.add_argument(
        "--shapes", default="", metavar="NAME:DxD,...",
        help="shapes of random inputs with symbolic dimensions (default: each symbol = 1)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of random inputs")


def inputs_for(signature: list[TensorInfo], args: argparse.Namespace) -> dict[str, Any]:
    return make_inputs(signature, args.input, args.shapes, args.seed)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("building (when given an ONNX model)")
    group.add_argument("--device", choices=DEVICES, help="target device (default: cuda if present)")
    group.add_argument(
        "--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
        help="optimization level: 0 cleanup only, 3 default",
    )


def is_onnx_model(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def build_quietly(model: str | Path, args: argparse.Namespace, **options: Any) -> kiln.Engine:
    """Build ``model`` with ``--device``/``--opt-level``, showing a spinner on a terminal."""
    with Console(stderr=True).status(f"building {model}"):
        return kiln.build(model, device=args.device, opt_level=args.opt_level, **options)


def engine_from(path: str, args: argparse.Namespace) -> kiln.Engine:
    """Load an engine file, or build one from an ONNX model (by its ``.onnx`` suffix)."""
    if is_onnx_model(path):
        return build_quietly(path, args)
    return kiln.load(path, device=args.device)
