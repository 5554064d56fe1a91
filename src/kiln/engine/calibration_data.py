"""Calibration data: batches of model inputs to run through the model while collecting ranges.

A source is a directory of NumPy files or any iterable of ``{input name: array}`` mappings (NumPy
arrays, torch tensors or anything ``np.asarray`` takes). Every batch is checked against the
model's inputs as strictly as an engine checks what it runs: the same names, the same dtypes, the
same rank and static sizes; symbolic dimensions may vary from batch to batch.
"""

from __future__ import annotations

import itertools
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from kiln.errors import ConfigError, InputError
from kiln.ops.dtypes import element_type, to_numpy

Batch = dict[str, np.ndarray]
Dim = int | str | None


class InputDescription(Protocol):
    """What is needed of a model input: :class:`kiln.runtime.io.TensorInfo` is one."""

    name: str
    # an element type name ("float32"), an ONNX type (int or onnx_ir DataType), a NumPy or torch
    # dtype, or None (any)
    dtype: Any
    shape: tuple[Dim, ...] | None  # ints (static), names (symbolic), None (unknown)


class DeclaredInput(NamedTuple):
    """A model input as the model declares it, for models not yet built into an engine."""

    name: str
    dtype: Any  # as InputDescription.dtype
    shape: tuple[Dim, ...] | None


ModelInput = InputDescription | DeclaredInput | tuple[str, Any, Sequence[Dim] | None]
CalibrationSource = str | os.PathLike | Iterable[Mapping[str, Any]]


class _Input:
    def __init__(self, name: str, dtype: np.dtype | None, shape: tuple[Dim, ...] | None) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype or '?'}[{dims}]"


def calibration_batches(
    source: CalibrationSource, inputs: Sequence[ModelInput], limit: int | None = None
) -> list[Batch]:
    """The batches of ``source`` as ``{input name: NumPy array}``, checked against ``inputs``.

    ``inputs`` describes the model's inputs, each a :class:`~kiln.runtime.io.TensorInfo` (or any
    object with ``name``, ``dtype`` and ``shape``), a :class:`DeclaredInput` or a
    ``(name, dtype, shape)`` tuple. ``source``:

    * a directory: each ``*.npz`` file is one batch, its arrays named after the inputs; a ``*.npy``
      file is one batch of the only input, allowed for single-input models. Files are taken in
      name order; other files are ignored.
    * an iterable of mappings from input name to array (NumPy, torch tensor or array-like); batches
      are numbered from 0 in messages.

    ``limit`` caps the number of batches taken (files beyond it are not read, an iterable is not
    consumed further). Raises :class:`InputError`, naming the batch and the input, when a batch
    lacks an input or has an unknown one, or has an array of another dtype, rank or static size
    (or a symbolic dimension of size 0), and when there is no batch at all.
    """
    described = [_describe(entry) for entry in inputs]
    if not described:
        raise InputError("the model has no inputs to calibrate with")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"calibration batch limit must be a positive integer or None, not {limit!r}")
    if isinstance(source, (str, os.PathLike)):
        batches = _from_directory(Path(source), described, limit)
    else:
        batches = _from_iterable(source, described, limit)
    checked = [_check(where, batch, described) for where, batch in batches]
    if not checked:
        raise InputError("calibration data holds no batches; give at least one")
    return checked


def _describe(entry: ModelInput) -> _Input:
    if isinstance(entry, tuple):
        if len(entry) != 3:
            raise TypeError(f"a model input is (name, dtype, shape), not {entry!r}")
        name, dtype, shape = entry
    else:
        name, dtype, shape = entry.name, entry.dtype, entry.shape
    kind = getattr(entry, "kind", "tensor")
    if kind != "tensor":
        raise InputError(
            f"input {name!r} is a {kind.replace('_', ' ')}; calibration takes tensor inputs only"
        )
    if dtype is not None:
        try:
            dtype = element_type(dtype).numpy
        except (KeyError, TypeError):
            raise TypeError(f"input {name!r} has unknown dtype {dtype!r}") from None
    return _Input(name, dtype, None if shape is None else tuple(shape))


def _names(inputs: list[_Input]) -> str:
    return ", ".join(info.describe() for info in inputs)


def _from_directory(
    directory: Path, inputs: list[_Input], limit: int | None
) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not directory.exists():
        raise InputError(f"calibration data directory {directory} does not exist")
    if not directory.is_dir():
        raise InputError(
            f"calibration data {directory} is not a directory; give a directory of .npz files "
            "(one batch each) or an iterable of batches"
        )
    files = sorted(
        (f for f in directory.iterdir() if f.is_file() and f.suffix in (".npz", ".npy")),
        key=lambda f: f.name,
    )
    if not files:
        raise InputError(
            f"calibration data directory {directory} holds no .npz (or, for a single-input model, "
            f".npy) files; save each batch with np.savez(path, **{{input name: array}})"
        )
    if len(inputs) > 1:
        npy = [f.name for f in files if f.suffix == ".npy"]
        if npy:
            raise InputError(
                f"calibration file {npy[0]!r} in {directory} is a .npy file, which holds one array, "
                f"but the model has {len(inputs)} inputs ({_names(inputs)}); save each batch as "
                "a .npz file with np.savez(path, **{input name: array})"
            )
    return ((f"calibration batch {f.name!r}", _load(f, inputs)) for f in files[:limit])


def _load(file: Path, inputs: list[_Input]) -> dict[str, np.ndarray]:
    try:
        if file.suffix == ".npy":
            return {inputs[0].name: np.load(file, allow_pickle=False)}
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"calibration file {file} cannot be read ({error})") from None


def _from_iterable(
    source: Any, inputs: list[_Input], limit: int | None
) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if isinstance(source, Mapping):
        raise InputError(
            "calibration data is a single mapping; pass an iterable of batches, e.g. a list of "
            "{input name: array} dicts"
        )
    try:
        batches = iter(source)
    except TypeError:
        raise InputError(
            "calibration data must be a directory path or an iterable of {input name: array} "
            f"dicts, not {type(source).__name__}"
        ) from None
    for index, batch in enumerate(itertools.islice(batches, limit)):
        if not isinstance(batch, Mapping):
            raise InputError(
                f"calibration batch {index} is a {type(batch).__name__}, not a mapping of input "
                "name to array"
            )
        yield f"calibration batch {index}", batch


def _check(where: str, batch: Mapping[str, Any], inputs: list[_Input]) -> Batch:
    expected = [info.name for info in inputs]
    missing = [name for name in expected if name not in batch]
    unexpected = [str(name) for name in batch if name not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"lacks input(s) {', '.join(map(repr, missing))}")
        if unexpected:
            problems.append(f"has unknown input(s) {', '.join(map(repr, unexpected))}")
        raise InputError(f"{where} {' and '.join(problems)}; the model's inputs are: {_names(inputs)}")
    symbols: dict[str, tuple[int, str]] = {}
    return {info.name: _check_array(where, info, batch[info.name], symbols) for info in inputs}


def _check_array(where: str, info: _Input, value: Any, symbols: dict[str, tuple[int, str]]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        array = to_numpy(value)
        how = f"tensor.to(torch.{_torch_name(info.dtype)})"
    else:
        array = np.asarray(value)
        how = f"array.astype(np.{info.dtype})" if info.dtype is not None else ""
    if info.dtype is not None and array.dtype != info.dtype:
        if array.dtype.kind == "V" and array.dtype.itemsize == info.dtype.itemsize:
            array = array.view(info.dtype)  # ml_dtypes types (bfloat16, fp8) come back from .npy as raw
        else:
            raise InputError(
                f"{where}: input {info.name!r} has dtype {array.dtype}, the model expects "
                f"{info.dtype}; convert it first ({how})"
            )
    if info.shape is None:
        return array
    shape = array.shape
    if len(shape) != len(info.shape):
        raise InputError(
            f"{where}: input {info.name!r} has rank {len(shape)} (shape {list(shape)}), the model "
            f"expects rank {len(info.shape)} ({info.describe()})"
        )
    for axis, (size, declared) in enumerate(zip(shape, info.shape)):
        if isinstance(declared, int) and size != declared:
            raise InputError(
                f"{where}: input {info.name!r} has size {size} in dimension {axis}, the model "
                f"expects {declared} ({info.describe()})"
            )
        if not isinstance(declared, int) and size < 1:
            raise InputError(
                f"{where}: input {info.name!r} has size {size} in dimension {axis} "
                f"({declared or 'unknown'!r}); calibration batches need at least 1 there"
            )
        if isinstance(declared, str):
            seen = symbols.setdefault(declared, (size, info.name))
            if seen[0] != size:
                raise InputError(
                    f"{where}: dimension {declared!r} is {seen[0]} in input {seen[1]!r} but {size} "
                    f"in input {info.name!r}"
                )
    return array


def _torch_name(dtype: np.dtype | None) -> str:
    if dtype is None:
        return "float32"
    storage = element_type(dtype).torch
    return str(storage).removeprefix("torch.") if storage is not None else str(dtype)
