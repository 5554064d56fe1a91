"""Argument groups the tools share, and what they turn into: inputs, an engine, a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

import kiln
from kiln.cli.run import make_inputs
from kiln.config import CALIBRATION_METHODS, DEVICES, Profile
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


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "calibration (int8 / fp8 scales, fp16 range; the data an accuracy budget is measured on)"
    )
    group.add_argument(
        "--calibration-data", metavar="DIR",
        help="a directory of .npz files (one batch each, arrays named as the model's inputs; "
        ".npy files for a one-input model)",
    )
    group.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default="entropy",
        help="how observed activations become int8/fp8 ranges (default: entropy)",
    )
    group.add_argument(
        "--calibration-percentile", type=float, default=99.99, metavar="P",
        help="for --calibration-method percentile: the percentile of |x| kept (99.99)",
    )
    group.add_argument(
        "--calibration-cache", metavar="PATH",
        help="calibrated ranges to reuse (written after calibrating; a later build needs no data)",
    )
    group.add_argument(
        "--calibration-batches", type=int, metavar="N", help="use at most N calibration batches",
    )


def calibration_options(args: argparse.Namespace) -> dict[str, Any]:
    """The build options of :func:`add_calibration_arguments`, but the data."""
    return {
        "calibration_method": args.calibration_method,
        "calibration_percentile": args.calibration_percentile,
        "calibration_cache": args.calibration_cache,
        "calibration_batches": args.calibration_batches,
    }


def add_layer_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layer-precision", action="append", default=[], metavar="NAME=fp32",
        help="keep layer NAME (as `kiln inspect` shows it) in fp32 under a reduced precision, or "
        "(NAME=fp16) unquantized under int8/fp8; repeatable",
    )


def layer_precisions(entries: list[str]) -> dict[str, str]:
    """``["conv1=fp32"]`` (``--layer-precision`` values) -> ``{"conv1": "fp32"}``."""
    pinned = {}
    for entry in entries:
        name, sep, precision = entry.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"--layer-precision takes NAME=PRECISION, not {entry!r}")
        pinned[name] = precision
    return pinned


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
