"""Triton's ``model_warmup``: sample requests every instance runs before its version serves.

On a GPU the first run of an input shape runs eagerly and its second captures a CUDA graph
(see :mod:`kiln.runtime.graphs`), so each sample runs at least twice there: a server that warms
up every batch size its batcher may form never runs eagerly or captures under load. Samples are
zeros (``zero_data``), uniform random values (``random_data``), or a file of raw little-endian
bytes in the model's ``warmup/`` directory (``input_data_file``), as in Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2

from kiln.serve.protocol import DATATYPES
from kiln.serve.repository import ModelLoadError

WARMUP_DIRECTORY = "warmup"


@dataclass(frozen=True)
class WarmupSample:
    name: str
    inputs: dict[str, np.ndarray]
    count: int


def warmup_samples(config: model_config_pb2.ModelConfig, model_dir: Path) -> list[WarmupSample]:
    """The config's warm-up samples with their input arrays (batch dimension first when the model
    batches)."""
    samples = []
    rng = np.random.default_rng(0)
    for index, warmup in enumerate(config.model_warmup):
        label = f"model_warmup {warmup.name or index!r}"
        if config.max_batch_size > 0 and not 1 <= warmup.batch_size <= config.max_batch_size:
            raise ModelLoadError(
                f"{label}: batch_size must be from 1 to max_batch_size ({config.max_batch_size})"
            )
        if not warmup.inputs:
            raise ModelLoadError(f"{label} has no inputs")
        batch = (warmup.batch_size,) if config.max_batch_size > 0 else ()
        inputs = {
            name: _sample(f"{label} input {name!r}", spec, batch, model_dir, rng)
            for name, spec in warmup.inputs.items()
        }
        samples.append(WarmupSample(warmup.name or str(index), inputs, max(warmup.count, 1)))
    return samples


def _sample(
    label: str, spec: model_config_pb2.ModelWarmup.Input, batch: tuple[int, ...], model_dir: Path,
    rng: np.random.Generator,
) -> np.ndarray:
    datatype = model_config_pb2.DataType.Name(spec.data_type).removeprefix("TYPE_")
    if datatype not in DATATYPES or datatype == "BYTES":
        raise ModelLoadError(f"{label}: data_type {datatype} cannot be warmed up; use a numeric type")
    dtype = DATATYPES[datatype]
    if any(d < 0 for d in spec.dims):
        raise ModelLoadError(f"{label}: dims must be sizes, not {list(spec.dims)}")
    shape = (*batch, *spec.dims)
    kind = spec.WhichOneof("input_data_type")
    if kind == "zero_data":
        return np.zeros(shape, dtype)
    if kind == "random_data":
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        if dtype.kind in "iu":
            return rng.integers(0, 100, shape).astype(dtype)
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if kind == "input_data_file":
        return _from_file(label, spec.input_data_file, dtype, shape, model_dir)
    raise ModelLoadError(f"{label}: set zero_data, random_data or input_data_file")


def _from_file(label: str, file: str, dtype: np.dtype, shape: tuple[int, ...], model_dir: Path) -> np.ndarray:
    directory = (model_dir / WARMUP_DIRECTORY).resolve()
    path = (directory / file).resolve()
    if not path.is_relative_to(directory) or not path.is_file():
        raise ModelLoadError(f"{label}: no file {file!r} in {model_dir / WARMUP_DIRECTORY}")
    data = path.read_bytes()
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ModelLoadError(f"{label}: {file} holds {len(data)} bytes; shape {list(shape)} takes {expected}")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)

