"""Engine: a built, loadable, runnable model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from kiln.engine import format as engine_format
from kiln.engine.format import EngineData
from kiln.errors import EngineCompatibilityError, EngineFormatError
from kiln.runtime.executor import Program, string_tensor
from kiln.runtime.io import TensorInfo, bind_inputs, export_outputs
from kiln.runtime.timing import COMPUTE, DEVICE_TO_HOST, HOST_TO_DEVICE, RUN_START, Timeline


class Engine:
    """Runs an engine's plan on ``cpu`` or ``cuda``.

    ``run`` takes a mapping of input name to NumPy array (or NumPy scalar) or torch tensor and
    returns the outputs by name, in the model's order, as NumPy arrays when NumPy came in and as
    torch tensors on the engine's device otherwise.
    """

    def __init__(self, data: EngineData, device: str | None = None, source: str = "engine") -> None:
        manifest = data.manifest
        self._data = data
        self.device = torch.device(_check_device(manifest, device, source))
        try:
            weights: dict[str, Any] = {
                key: tensor.to(self.device) for key, tensor in data.tensors.items()
            }
            weights.update(
                {key: string_tensor(e) for key, e in manifest.get("string_tensors", {}).items()}
            )
            self._program = Program(manifest["plan"], weights, self.device)
            self.inputs = [TensorInfo.from_json(e) for e in manifest["signature"]["inputs"]]
            self.outputs = [TensorInfo.from_json(e) for e in manifest["signature"]["outputs"]]
            self._tf32 = manifest.get("precision") == "tf32"
        except (KeyError, TypeError, ValueError) as error:
            raise EngineFormatError(f"{source}: the engine's plan is malformed ({error})") from None

    @property
    def manifest(self) -> dict[str, Any]:
        return self._data.manifest

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self._data.manifest["layers"]

    @property
    def build_report(self) -> list[dict[str, Any]]:
        """Per optimization pass: name, node counts before and after, matches per rule, seconds."""
        return self._data.manifest["build"]["passes"]

    def run(self, inputs: Mapping[str, Any], timeline: Timeline | None = None) -> dict[str, Any]:
        """Run on ``inputs``; ``timeline`` (see :mod:`kiln.runtime.timing`) times the run."""
        mark = timeline.mark if timeline is not None else _no_mark
        layer_timeline = timeline if timeline is not None and timeline.layers else None
        mark(RUN_START)
        bound, as_numpy = bind_inputs(self.inputs, inputs, self.device)
        mark(HOST_TO_DEVICE)
        with torch.inference_mode(), fp32_arithmetic(self._tf32):
            values = self._program.run(self._program.new_env(bound), layer_timeline)
        mark(COMPUTE)
        outputs = export_outputs(self.outputs, values, as_numpy)
        mark(DEVICE_TO_HOST)
        return outputs

    def save(self, path: str | os.PathLike) -> None:
        engine_format.save(self._data, path)

    def to_bytes(self) -> bytes:
        return engine_format.dumps(self._data)

    def __repr__(self) -> str:
        ins = ", ".join(i.describe() for i in self.inputs)
        outs = ", ".join(o.describe() for o in self.outputs)
        return f"<kiln.Engine on {self.device}: ({ins}) -> ({outs}), {len(self.layers)} layers>"


def _no_mark(label: str) -> None:
    pass


@contextlib.contextmanager
def fp32_arithmetic(tf32: bool = False) -> Iterator[None]:
    """fp32 matmuls and convolutions as the engine promises, whatever the process set: strict
    (no TF32) by default, on TF32 tensor cores for a ``tf32`` engine."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def strict_fp32() -> contextlib.AbstractContextManager[None]:
    return fp32_arithmetic(tf32=False)


def _check_device(manifest: dict[str, Any], device: str | None, source: str) -> str:
    target = manifest.get("target", {}).get("device")
    device = device or target
    if device not in ("cpu", "cuda"):
        raise EngineCompatibilityError(f"{source}: unknown device {device!r}; use 'cpu' or 'cuda'")
    if device != target:
        raise EngineCompatibilityError(
            f"{source} was built for {target}, not {device}; rebuild it with "
            f"`kiln build MODEL --device {device}`"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineCompatibilityError(
            f"{source} was built for cuda but no CUDA GPU is visible here; rebuild it with "
            "`kiln build MODEL --device cpu`"
        )
    return device


def load(path: str | os.PathLike, device: str | None = None) -> Engine:
    """Load an engine file; ``device`` defaults to the one it was built for."""
    return Engine(engine_format.load(path), device, source=str(path))


def from_bytes(blob: bytes, device: str | None = None) -> Engine:
    return Engine(engine_format.loads(blob), device)
