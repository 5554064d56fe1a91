"""Engine: a built, loadable, runnable model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from kiln.engine import format as engine_format
from kiln.engine.format import EngineData
from kiln.errors import EngineCompatibilityError, EngineFormatError
from kiln.runtime.accuracy import Infer, OutputAccuracy, accuracy_report, onnxruntime_reference
from kiln.runtime.executor import Program, WeightStore, string_tensor
from kiln.kernels.arithmetic import fp32_arithmetic
from kiln.runtime.graphs import DEFAULT_GRAPH_CAPACITY, GraphCache, signature_of
from kiln.runtime.io import TensorInfo, bind_inputs, export_outputs
from kiln.runtime.profiles import Profile, check_profiles, read_profiles
from kiln.runtime.timing import COMPUTE, DEVICE_TO_HOST, HOST_TO_DEVICE, RUN_START, Timeline


class Engine:
    """Runs an engine's plan on ``cpu`` or ``cuda``.

    ``run`` takes a mapping of input name to NumPy array (or NumPy scalar) or torch tensor and
    returns the outputs by name, in the model's order, as NumPy arrays when NumPy came in and as
    torch tensors on the engine's device otherwise.
    """

    def __init__(
        self, data: EngineData, device: str | None = None, source: str = "engine",
        cuda_graphs: bool = True,
    ) -> None:
        manifest = data.manifest
        self._data = data
        self.device = torch.device(_check_device(manifest, device, source))
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        try:
            tensors: dict[str, Any] = dict(data.tensors)
            tensors.update(
                {key: string_tensor(e) for key, e in manifest.get("string_tensors", {}).items()}
            )
            self._program = Program(manifest["plan"], WeightStore(tensors, self.device), self.device)
            self.inputs = [TensorInfo.from_json(e) for e in manifest["signature"]["inputs"]]
            self.outputs = [TensorInfo.from_json(e) for e in manifest["signature"]["outputs"]]
            self._profiles = read_profiles(manifest)
            self._tf32 = manifest.get("precision") == "tf32"
        except (KeyError, TypeError, ValueError) as error:
            raise EngineFormatError(f"{source}: the engine's plan is malformed ({error})") from None
        self._context = ExecutionContext(self)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._data.manifest

    @property
    def profiles(self) -> tuple[Profile, ...]:
        """The optimization profiles the engine was built with; inputs must fit one of them."""
        return self._profiles

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self._data.manifest["layers"]

    @property
    def build_report(self) -> list[dict[str, Any]]:
        """Per optimization pass: name, node counts before and after, matches per rule, seconds."""
        return self._data.manifest["build"]["passes"]

    def run(
        self, inputs: Mapping[str, Any], timeline: Timeline | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> dict[str, Any]:
        """Run on ``inputs``; ``timeline`` (see :mod:`kiln.runtime.timing`) times the run.

        ``stream``: the CUDA stream to run on (the current one by default). Runs through
        ``Engine.run`` share one :class:`ExecutionContext`; concurrent callers each need their own
        (:meth:`create_context`).
        """
        return self._context.run(inputs, timeline, stream)

    @property
    def captured_signatures(self) -> int:
        """How many input-shape signatures ``run`` replays from a CUDA graph."""
        return self._context.captured_signatures

    def create_context(
        self, cuda_graphs: bool | None = None, graph_capacity: int = DEFAULT_GRAPH_CAPACITY
    ) -> ExecutionContext:
        """A new execution context: its own CUDA graphs and memory, for one concurrent caller.
        ``graph_capacity``: how many input-shape signatures keep their CUDA graph."""
        enabled = self.cuda_graphs if cuda_graphs is None else cuda_graphs
        return ExecutionContext(self, enabled, graph_capacity)

    def accuracy_report(
        self, data: Iterable[Mapping[str, Any]], reference: str | os.PathLike | bytes | Infer,
    ) -> list[OutputAccuracy]:
        """Compare this engine with ``reference`` on every batch of ``data`` (input name ->
        array): per output, max abs/rel error, cosine (overall and worst sample) and top-1
        agreement for class scores.

        ``reference``: the FP32 ONNX model (a path or its bytes), run in ONNX Runtime on the CPU,
        or any callable taking a batch and returning the outputs by name.
        """
        run_reference = reference if callable(reference) else onnxruntime_reference(reference)
        names = [output.name for output in self.outputs]
        return accuracy_report(self.run, run_reference, data, names)

    def save(self, path: str | os.PathLike) -> None:
        engine_format.save(self._data, path)

    def to_bytes(self) -> bytes:
        return engine_format.dumps(self._data)

    def __repr__(self) -> str:
        ins = ", ".join(i.describe() for i in self.inputs)
        outs = ", ".join(o.describe() for o in self.outputs)
        return f"<kiln.Engine on {self.device}: ({ins}) -> ({outs}), {len(self.layers)} layers>"


class ExecutionContext:
    """One caller's state for running an engine: its captured CUDA graphs and their memory.

    Runs on one context are serial; concurrent streams or threads each take their own context.
    On a GPU, each input-shape signature is captured in a CUDA graph on its second run and
    replayed from then on (see :mod:`kiln.runtime.graphs`), unless ``cuda_graphs`` is off or the
    run is profiled layer by layer.
    """

    def __init__(
        self, engine: Engine, cuda_graphs: bool | None = None,
        graph_capacity: int = DEFAULT_GRAPH_CAPACITY,
    ) -> None:
        self.engine = engine
        enabled = engine.cuda_graphs if cuda_graphs is None else cuda_graphs
        self._graphs = GraphCache(graph_capacity) if enabled and engine.device.type == "cuda" else None

    @property
    def captured_signatures(self) -> int:
        """How many input-shape signatures this context replays from a CUDA graph."""
        return 0 if self._graphs is None else self._graphs.captured

    def run(
        self, inputs: Mapping[str, Any], timeline: Timeline | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> dict[str, Any]:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return self._run(inputs, timeline)

    def _run(self, inputs: Mapping[str, Any], timeline: Timeline | None) -> dict[str, Any]:
        engine = self.engine
        mark = timeline.mark if timeline is not None else _no_mark
        layer_timeline = timeline if timeline is not None and timeline.layers else None
        mark(RUN_START)
        bound, as_numpy = bind_inputs(engine.inputs, inputs, engine.device)
        check_profiles(engine.profiles, bound)
        mark(HOST_TO_DEVICE)
        program = engine._program

        def compute(feed: dict[str, Any]) -> list[Any]:
            return program.run(program.new_env(feed), layer_timeline)

        with torch.inference_mode(), fp32_arithmetic(engine._tf32):
            key = signature_of(bound) if self._graphs is not None and layer_timeline is None else None
            if key is None:
                values, static = compute(bound), False
            else:
                values, static = self._graphs.run(key, bound, compute)
            if static and not as_numpy:  # the next replay overwrites the graph's buffers
                values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
        mark(COMPUTE)
        outputs = export_outputs(engine.outputs, values, as_numpy)
        mark(DEVICE_TO_HOST)
        return outputs


def _no_mark(label: str) -> None:
    pass


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


def load(path: str | os.PathLike, device: str | None = None, cuda_graphs: bool = True) -> Engine:
    """Load an engine file; ``device`` defaults to the one it was built for. ``cuda_graphs``:
    capture and replay runs on a GPU as CUDA graphs (see :class:`ExecutionContext`)."""
    return Engine(engine_format.load(path), device, source=str(path), cuda_graphs=cuda_graphs)


def from_bytes(blob: bytes, device: str | None = None, cuda_graphs: bool = True) -> Engine:
    return Engine(engine_format.loads(blob), device, cuda_graphs=cuda_graphs)
