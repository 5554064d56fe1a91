"""``kiln run ENGINE``: run an engine on given or random inputs and summarise the outputs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import kiln
from kiln.errors import InputError
from kiln.runtime import TensorInfo

HELP = "run an engine on inputs from .npy files (random ones by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", help="engine file (.kiln)")
    parser.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input's values"
    )
    parser.add_argument(
        "--shapes", default="", metavar="NAME:DxD,...",
        help="shapes of random inputs with symbolic dimensions (default: each symbol = 1)",
    )
    parser.add_argument("--output-dir", type=Path, help="save each output as NAME.npy here")
    parser.add_argument("--seed", type=int, default=0, help="seed of random inputs")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="device to load the engine on")


def main(args: argparse.Namespace) -> int:
    engine = kiln.load(args.engine, device=args.device)
    outputs = engine.run(
        make_inputs(engine.inputs, args.input, args.shapes, args.seed, engine.profiles)
    )
    table = Table(title=f"outputs of {args.engine}")
    for column in ("name", "dtype", "shape", "min", "max", "mean"):
        table.add_column(column, justify="right" if column in ("min", "max", "mean") else "left")
    for name, value in outputs.items():
        table.add_row(name, *_summary(value))
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            np.save(args.output_dir / f"{name}.npy", value)
    Console().print(table)
    return 0


def make_inputs(
    signature: list[TensorInfo], input_specs: list[str], shapes_text: str, seed: int,
    profiles: Sequence[kiln.Profile] = (),
) -> dict[str, Any]:
    """Inputs from ``NAME=FILE.npy`` specs, random ones for the rest: of ``--shapes``, else of the
    first optimization profile's opt shapes."""
    given = dict(_parse_input(spec) for spec in input_specs)
    opt = {name: shapes[1] for name, shapes in profiles[0].shapes.items()} if profiles else {}
    shapes = {**opt, **parse_shapes(shapes_text)}
    rng = np.random.default_rng(seed)
    inputs = {
        info.name: given[info.name] if info.name in given else random_input(info, shapes, rng)
        for info in signature
    }
    inputs.update({k: v for k, v in given.items() if k not in inputs})  # let run() name strays
    return inputs


def _parse_input(spec: str) -> tuple[str, np.ndarray]:
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise InputError(f"--input takes NAME=FILE.npy, not {spec!r}")
    try:
        return name, np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"input {name!r}: cannot read {path}: {error}") from None


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``"ids:1x16,mask:1x16"`` -> ``{"ids": (1, 16), "mask": (1, 16)}``."""
    shapes = {}
    for item in filter(None, text.split(",")):
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise InputError(f"--shapes takes NAME:DxDxD, not {item!r}") from None
        if not sep or not name:
            raise InputError(f"--shapes takes NAME:DxDxD, not {item!r}")
    return shapes


def random_input(
    info: TensorInfo, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator
) -> Any:
    """Random values of the input's dtype and shape (symbolic dimensions set to 1)."""
    if info.kind != "tensor":
        raise InputError(f"input {info.name!r} is a {info.kind}; give it with --input")
    if info.name in shapes:
        shape = shapes[info.name]
    elif info.shape is None:
        raise InputError(f"input {info.name!r} has unknown rank; give its shape with --shapes")
    else:
        shape = tuple(d if isinstance(d, int) else 1 for d in info.shape)
    dtype = np.dtype(info.dtype or "float32")
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "O":
        raise InputError(f"input {info.name!r} holds strings; give it with --input")
    return rng.standard_normal(shape).astype(dtype)


def _summary(value: Any) -> list[str]:
    if not isinstance(value, np.ndarray):
        return [type(value).__name__, "", "", "", ""]
    shape = "x".join(map(str, value.shape)) or "scalar"
    if value.size == 0 or value.dtype.kind not in "biuf":
        return [str(value.dtype), shape, "", "", ""]
    as_float = value.astype(np.float64)
    return [str(value.dtype), shape, f"{as_float.min():.4g}", f"{as_float.max():.4g}", f"{as_float.mean():.4g}"]
