"""Check inputs against an engine's signature and convert values at the engine's boundary."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.errors import InputError
from kiln.ops.dtypes import element_type, to_numpy, to_torch


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of an engine. ``shape`` holds ints and symbolic names (or None)."""

    name: str
    dtype: str | None
    shape: tuple[int | str | None, ...] | None
    kind: str = "tensor"

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> TensorInfo:
        shape = entry["shape"]
        return cls(entry["name"], entry["dtype"], None if shape is None else tuple(shape), entry["kind"])

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype or '?'}[{dims}]"


def bind_inputs(
    signature: list[TensorInfo], given: Mapping[str, Any], device: torch.device
) -> tuple[dict[str, Any], bool]:
    """Validate ``given`` and convert it to device values; also say whether NumPy came in."""
    if not isinstance(given, Mapping):
        raise InputError(f"inputs must be a mapping of input name to array, not {type(given).__name__}")
    expected = {info.name: info for info in signature}
    unknown = [name for name in given if name not in expected]
    if unknown:
        name = unknown[0]
        by_case = {n.lower(): n for n in expected}
        close = [by_case[name.lower()]] if name.lower() in by_case else (
            difflib.get_close_matches(name, list(expected), n=1)
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown input {name!r}{hint}; the engine's inputs are: {_names(signature)}")
    missing = [name for name in expected if name not in given]
    if missing:
        raise InputError(f"missing input {missing[0]!r}; the engine's inputs are: {_names(signature)}")
    saw_numpy = not any(isinstance(v, torch.Tensor) for v in given.values())
    symbols: dict[str, tuple[int, str]] = {}
    bound = {}
    for info in signature:
        bound[info.name] = _bind(info, given[info.name], device, symbols)
    return bound, saw_numpy


def _names(signature: list[TensorInfo]) -> str:
    return ", ".join(info.describe() for info in signature)


def _bind(info: TensorInfo, value: Any, device: torch.device, symbols: dict) -> Any:
    if info.kind == "sequence":
        if not isinstance(value, (list, tuple)):
            raise InputError(f"input {info.name!r} is a sequence: pass a list of arrays")
        return [_bind_tensor(info, v, device, None) for v in value]
    if info.kind.startswith("optional"):
        if value is None:
            return None
        if info.kind == "optional_sequence":
            return [_bind_tensor(info, v, device, None) for v in value]
        return _bind_tensor(info, value, device, None)
    return _bind_tensor(info, value, device, symbols)


def _bind_tensor(info: TensorInfo, value: Any, device: torch.device, symbols: dict | None) -> Any:
    if isinstance(value, torch.Tensor):
        try:
            dtype = element_type(value.dtype).name
        except KeyError:
            raise InputError(f"input {info.name!r} has unsupported torch dtype {value.dtype}") from None
        if info.dtype is not None and element_type(info.dtype).torch != value.dtype:
            raise InputError(
                f"input {info.name!r} has dtype {dtype}, the engine expects {info.dtype}"
            )
        tensor = value.to(device)
    else:
        array = np.asarray(value)
        if array.dtype.kind in "US":  # Python strings arrive as fixed-width NumPy strings
            array = array.astype(object)
        if info.dtype is not None and array.dtype != element_type(info.dtype).numpy:
            raise InputError(
                f"input {info.name!r} has dtype {array.dtype}, the engine expects {info.dtype}; "
                f"convert it first (e.g. array.astype(np.{info.dtype}))"
            )
        tensor = to_torch(array, device)
    if symbols is not None:
        _check_shape(info, tuple(tensor.shape), symbols)
    return tensor


def _check_shape(info: TensorInfo, shape: tuple[int, ...], symbols: dict) -> None:
    if info.shape is None:
        return
    if len(shape) != len(info.shape):
        raise InputError(
            f"input {info.name!r} has rank {len(shape)} (shape {list(shape)}), the engine expects "
            f"rank {len(info.shape)}: {info.describe()}"
        )
    for axis, (actual, declared) in enumerate(zip(shape, info.shape)):
        if isinstance(declared, int) and actual != declared:
            raise InputError(
                f"input {info.name!r} has size {actual} in dimension {axis}, the engine expects "
                f"{declared}: {info.describe()}"
            )
        if isinstance(declared, str):
            seen = symbols.setdefault(declared, (actual, info.name))
            if seen[0] != actual:
                raise InputError(
                    f"dimension {declared!r} is {seen[0]} in input {seen[1]!r} but {actual} in "
                    f"input {info.name!r}"
                )


def export_outputs(
    signature: list[TensorInfo], values: list[Any], as_numpy: bool
) -> dict[str, Any]:
    """Outputs keyed by name; NumPy (narrowed to the declared types) when NumPy came in."""
    if not as_numpy:
        return {info.name: value for info, value in zip(signature, values)}
    return {info.name: _to_numpy(info, value) for info, value in zip(signature, values)}


def _to_numpy(info: TensorInfo, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_to_numpy(info, v) for v in value]
    onnx_type = element_type(info.dtype).onnx_type if info.dtype else None
    return to_numpy(value, onnx_type)
