"""A loaded model version: its tensors as clients see them, the checks a request must pass
before it queues, and the batcher that runs it on the version's instances."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2

from kiln.runtime import Engine, TensorInfo
from kiln.runtime.graphs import DEFAULT_GRAPH_CAPACITY
from kiln.serve.batcher import Batcher, BatchingPolicy, Instance
from kiln.serve.metrics import ModelMetrics
from kiln.serve.protocol import DATATYPES, InferenceRequest, InvalidRequest, datatype_of
from kiln.serve.repository import ModelLoadError, ModelRepository, instance_devices
from kiln.serve.warmup import WarmupSample, warmup_samples

PLATFORM = "kiln"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2: "FP32", "INT64", "BYTES", ...
    dims: tuple[int, ...]  # -1: any size; without the batch dimension when the model batches


def config_datatype(data_type: int) -> str:
    """``TYPE_FP32`` -> ``FP32``; Triton's ``TYPE_STRING`` is KServe's ``BYTES``."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


class ModelVersion:
    def __init__(
        self, name: str, version: int, config: model_config_pb2.ModelConfig,
        engines: list[Engine], metrics: ModelMetrics, warmups: list[WarmupSample] = (),
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.max_batch_size = config.max_batch_size
        self.metrics = metrics
        self._signature = {info.name: info for info in engines[0].inputs}
        self.inputs = _resolve(config.input, engines[0].inputs, config.max_batch_size, "input")
        self.outputs = _resolve(config.output, engines[0].outputs, config.max_batch_size, "output")
        for sample in warmups:
            try:
                self.check(InferenceRequest(name, str(version), sample.inputs))
            except InvalidRequest as error:
                raise ModelLoadError(f"model_warmup {sample.name!r}: {error}") from None
        instances = [Instance(engine, DEFAULT_GRAPH_CAPACITY + len(warmups)) for engine in engines]
        for instance in instances:
            instance.warm_up(warmups)
        self.batcher = Batcher(f"{name}/{version}", instances, BatchingPolicy.from_config(config), metrics)

    @classmethod
    def load(
        cls, repository: ModelRepository, name: str, version: int,
        config: model_config_pb2.ModelConfig, metrics: ModelMetrics,
    ) -> ModelVersion:
        """Load one engine per instance: instances share nothing mutable."""
        warmups = warmup_samples(config, repository.model_dir(name))
        engines = [repository.load_engine(name, version, device) for device in instance_devices(config)]
        return cls(name, version, config, engines, metrics, warmups)

    def tensor_metadata(self, specs: dict[str, TensorSpec]) -> list[dict]:
        batch = (-1,) if self.max_batch_size > 0 else ()
        return [
            {"name": spec.name, "datatype": spec.datatype, "shape": [*batch, *spec.dims]}
            for spec in specs.values()
        ]

    def submit(self, request: InferenceRequest) -> Future:
        self.check(request)
        return self.batcher.submit(request.inputs, request.timeout_us)

    def check(self, request: InferenceRequest) -> None:
        """Everything a request can get wrong, found before it can share a batch with others."""
        label = f"model {self.name!r} version {self.version}"
        unknown = sorted(set(request.inputs) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(request.inputs))
        if unknown or missing:
            what = f"has no input {unknown[0]!r}" if unknown else f"needs input {missing[0]!r}"
            raise InvalidRequest(f"{label} {what}; its inputs are {_describe(self.inputs)}")
        for name in request.outputs:
            if name not in self.outputs:
                raise InvalidRequest(
                    f"{label} has no output {name!r}; its outputs are {', '.join(self.outputs)}"
                )
        batch_sizes = set()
        for name, array in request.inputs.items():
            spec = self.inputs[name]
            if array.dtype != DATATYPES[spec.datatype]:
                raise InvalidRequest(
                    f"input {name!r} has datatype {datatype_of(array.dtype)}, {label} expects {spec.datatype}"
                )
            shape = array.shape
            if self.max_batch_size > 0:
                if not shape or not 1 <= shape[0] <= self.max_batch_size:
                    raise InvalidRequest(
                        f"input {name!r} has shape {list(shape)}: its first dimension is the batch "
                        f"size, from 1 to {self.max_batch_size} for {label}"
                    )
                batch_sizes.add(shape[0])
                shape = shape[1:]
            if len(shape) != len(spec.dims) or any(d not in (-1, s) for d, s in zip(spec.dims, shape)):
                raise InvalidRequest(
                    f"input {name!r} has shape {list(array.shape)}, {label} expects "
                    f"{self.tensor_metadata({name: spec})[0]['shape']} (-1: any size)"
                )
        if len(batch_sizes) > 1:
            raise InvalidRequest(
                f"the inputs of one request must share the batch size, not {sorted(batch_sizes)}"
            )
        self._check_symbols(request.inputs)

    def _check_symbols(self, inputs: dict[str, np.ndarray]) -> None:
        """A dimension the engine names (``seq``) must have one size across the inputs."""
        seen: dict[str, tuple[int, str]] = {}
        for name, array in inputs.items():
            for symbol, size in zip(self._signature[name].shape or (), array.shape):
                if not isinstance(symbol, str):
                    continue
                first = seen.setdefault(symbol, (size, name))
                if first[0] != size:
                    raise InvalidRequest(
                        f"dimension {symbol!r} is {first[0]} in input {first[1]!r} but {size} "
                        f"in input {name!r}"
                    )


def _describe(specs: dict[str, TensorSpec]) -> str:
    return ", ".join(f"{s.name} ({s.datatype})" for s in specs.values())


def _resolve(
    declared: list, signature: list[TensorInfo], max_batch_size: int, kind: str
) -> dict[str, TensorSpec]:
    """The tensors clients see: the config's where it lists them, checked against the engine;
    otherwise the engine's own (Triton's auto-complete)."""
    engine = {}
    for info in signature:
        if info.kind != "tensor":
            raise ModelLoadError(f"{kind} {info.name!r} is a {info.kind}; kiln serve serves tensors only")
        dims = tuple(d if isinstance(d, int) else -1 for d in info.shape) if info.shape is not None else None
        if max_batch_size > 0:
            if not dims or dims[0] != -1:
                raise ModelLoadError(
                    f"{kind} {info.name!r} has no variable first dimension to batch on "
                    f"(shape {info.shape}); set max_batch_size: 0 in config.pbtxt"
                )
            dims = dims[1:]
        try:
            datatype = datatype_of(info.dtype)
        except InvalidRequest:
            raise ModelLoadError(
                f"{kind} {info.name!r} is {info.dtype}, which KServe v2 cannot carry"
            ) from None
        engine[info.name] = TensorSpec(info.name, datatype, dims)
    if not declared:
        missing_rank = [name for name, spec in engine.items() if spec.dims is None]
        if missing_rank:
            raise ModelLoadError(
                f"{kind} {missing_rank[0]!r} has unknown rank; declare its dims in config.pbtxt"
            )
        return engine
    specs = {}
    for tensor in declared:
        if tensor.name not in engine:
            raise ModelLoadError(
                f"config.pbtxt declares {kind} {tensor.name!r}; the engine's {kind}s are {', '.join(engine)}"
            )
        actual, datatype, dims = engine[tensor.name], config_datatype(tensor.data_type), tuple(tensor.dims)
        if datatype != actual.datatype:
            raise ModelLoadError(f"{kind} {tensor.name!r} is {actual.datatype} in the engine, not {datatype}")
        if actual.dims is not None:
            conflict = any(-1 not in (c, e) and c != e for c, e in zip(dims, actual.dims))
            if len(dims) != len(actual.dims) or conflict:
                raise ModelLoadError(
                    f"{kind} {tensor.name!r} has dims {list(actual.dims)} in the engine (batch dimension "
                    f"excluded when max_batch_size > 0), not {list(dims)}"
                )
            dims = tuple(e if c == -1 else c for c, e in zip(dims, actual.dims))  # the tighter of both
        specs[tensor.name] = TensorSpec(tensor.name, datatype, dims)
    if kind == "input" and set(specs) != set(engine):
        missing = sorted(set(engine) - set(specs))
        raise ModelLoadError(f"config.pbtxt does not declare input {missing[0]!r} of the engine")
    return specs
