"""Argument groups the tools share, and what they turn into: inputs, an engine, a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

import kiln
from kiln.cli.run import make_inputs
from kiln.config import DEVICES, Profile
from kiln.errors import ConfigError


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs (random ones by default, as `kiln run` makes them)")
    group.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input's values"
    )
    group.add_argument(
        "--shapes", default="", metavar="NAME:DxD,...",
        help="shapes of random inputs with symbolic dimensions (default: the first optimization "
        "profile's opt shapes, else each symbol = 1)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of random inputs")


def inputs_for(engine: kiln.Engine, args: argparse.Namespace) -> dict[str, Any]:
    return make_inputs(engine.inputs, args.input, args.shapes, args.seed, engine.profiles)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("building (when given an ONNX model)")
    group.add_argument("--device", choices=DEVICES, help="target device (default: cuda if present)")
    group.add_argument(
        "--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
        help="optimization level: 0 cleanup only, 3 default",
    )


def profile_spec(text: str) -> Profile:
    """An argparse type: ``"ids:1x16,8x128,64x512 mask:1x16,8x128,64x512"`` -> a :class:`Profile`.

    Each space-separated item is ``NAME:MIN,OPT,MAX``, or ``NAME:SHAPE`` for min = opt = max;
    shapes are sizes joined by ``x``. A bad spec is a usage error (exit 2).
    """
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for item in text.split():
        name, sep, ranges = item.rpartition(":")  # names such as "input:0" keep their colon
        try:
            points = tuple(tuple(int(d) for d in shape.split("x")) for shape in ranges.split(","))
        except ValueError:
            points = ()
        if not sep or not name or len(points) not in (1, 3):
            raise argparse.ArgumentTypeError(
                f"expected NAME:MIN,OPT,MAX or NAME:SHAPE with shapes like 1x16, not {item!r}"
            )
        if name in shapes:
            raise argparse.ArgumentTypeError(f"input {name!r} appears twice in one profile {text!r}")
        shapes[name] = points if len(points) == 3 else points[0]
    if not shapes:
        raise argparse.ArgumentTypeError("expected NAME:MIN,OPT,MAX, e.g. ids:1x16,8x128,64x512")
    try:
        return Profile(shapes)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def is_onnx_model(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def build_quietly(model: str | Path, args: argparse.Namespace, **options: Any) -> kiln.Engine:
    """Build ``model`` with ``--device``/``--opt-level``, showing a spinner on a terminal."""
    with Console(stderr=True).status(f"building {model}"):
        return kiln.build(model, device=args.device, opt_level=args.opt_level, **options)


def engine_from(path: str, args: argparse.Namespace) -> kiln.Engine:
    """Load an engine file, or build one from an ONNX model (by its ``.onnx`` suffix)."""
    cuda_graphs = not getattr(args, "no_cuda_graph", False)
    if is_onnx_model(path):
        engine = build_quietly(path, args)
        return engine if cuda_graphs else kiln.runtime.from_bytes(engine.to_bytes(), cuda_graphs=False)
    return kiln.load(path, device=args.device, cuda_graphs=cuda_graphs)
