"""Build an engine: frontend -> passes -> lowering -> choice selection -> plan and manifest."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kiln.config import BEST, QUANTIZED_PRECISIONS, BuildConfig
from kiln.engine.calibration_data import CalibrationSource, DeclaredInput, calibration_batches
from kiln.engine.format import EngineData
from kiln.engine.memory import plan_memory
from kiln.engine.plan import layer_info, plan_graph
from kiln.engine.profiles import check_profiles, profile_symbols
from kiln.engine.progress import ProgressCallback, phase
from kiln.errors import BuildError, ConfigError
from kiln.frontend.onnx import ModelSource, load_onnx
from kiln.lowering import LoweredGraph, LoweredModel, lower
from kiln.lowering.spec import KernelSpec, ValueType
from kiln.ops.custom import is_custom_op
from kiln.ops.dtypes import element_type, to_torch
from kiln.passes import optimize
from kiln.passes.calibration import RangeCollector, load_cache, load_channel_cache, save_cache
from kiln.passes.quantize import Calibrated
from kiln.passes.pipeline import count_nodes
from kiln.passes.precision import FP16_MAX, PRECISION_KEY
from kiln.tune import Selection, TimingCache, Tuner

log = logging.getLogger("kiln.build")

# An fp16 build keeps a layer in fp32 when an activation it reads or writes reached this on the
# calibration data: half fp16's largest value, as data the model meets later can go further.
FP16_RANGE_LIMIT = FP16_MAX / 2


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BuildError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


# Makes a runnable engine of engine data: the runtime's, handed in by ``kiln.build`` because the
# builder may not import the runtime. The callable takes a batch of inputs, returns the outputs.
EngineRunner = Callable[[EngineData], Callable[[Mapping[str, Any]], Mapping[str, Any]]]


def build_engine(
    model: ModelSource, config: BuildConfig, progress: ProgressCallback | None = None,
    calibration_data: CalibrationSource | None = None, run_engine: EngineRunner | None = None,
) -> EngineData:
    """Build ``model`` with ``config``, reporting each phase to ``progress`` when given.

    int8/fp8 builds measure activation ranges by running an fp32 engine of the optimized graph
    (``run_engine``) on ``calibration_data`` (see :mod:`kiln.engine.calibration_data`); fp16
    builds given calibration data measure it too, and keep in fp32 the layers whose activations
    leave fp16's range (see :data:`FP16_RANGE_LIMIT`). Accuracy budgets and the ``best`` policy
    are for :mod:`kiln.precision_search`, which builds through this function.
    """
    if config.precision == BEST or config.accuracy_budget is not None:
        raise ConfigError("build_engine builds one precision; kiln.build applies accuracy budgets")
    start = time.perf_counter()
    device = resolve_device(config.device)
    _check_precision_on(device, config.precision)
    with phase(progress, "import") as current:
        ir_model = load_onnx(model)
        current.detail = f"{count_nodes(ir_model)} nodes"
    calibration = _Calibration(
        config, device, calibration_data, run_engine, _declared_inputs(ir_model), progress
    )
    calibrate = calibration.measure if config.precision in QUANTIZED_PRECISIONS else None
    pinned = dict(config.layer_precisions)
    overflow: dict[str, float] = {}
    if config.precision == "fp16" and calibration_data is not None and run_engine is not None:
        overflow = _fp16_overflow(model, config, calibration, progress)
        pinned.update(dict.fromkeys(overflow, "fp32"))
    with phase(progress, "passes") as current:
        ir_model, pass_records = optimize(
            ir_model, config.opt_level, config.precision, pinned, calibrate,
            rest_precision="fp16" if device == "cuda" else "fp32", float_outputs=config.debug_outputs,
        )
        if pass_records:
            current.detail = (
                f"{len(pass_records)} passes, {pass_records[0].nodes_before} -> "
                f"{pass_records[-1].nodes_after} nodes"
            )
    if config.debug_outputs:
        _expose_layer_outputs(ir_model.graph)
    data = _engine_data(ir_model, config, device, progress)
    data.manifest["build"] = {
        "seconds": round(time.perf_counter() - start, 3),
        "passes": [record.__dict__ for record in pass_records],
        "tuning": data.manifest["build"]["tuning"],
    }
    if overflow:
        data.manifest["build"]["fp16_overflow"] = overflow
    log.info(
        "built %d layers for %s in %.2fs", len(data.manifest["plan"]["steps"]), device,
        time.perf_counter() - start,
    )
    return data


def _engine_data(
    ir_model: ir.Model, config: BuildConfig, device: str, progress: ProgressCallback | None
) -> EngineData:
    """Lower the optimized ``ir_model``, choose its kernels and write the plan and manifest."""
    with phase(progress, "lowering") as current:
        lowered = lower(ir_model)
        current.detail = f"{len(lowered.graph.steps)} layers"
    _check_pinned_layers(config, lowered.graph)
    profiles = check_profiles(config.profiles, lowered.graph)
    # one step per top-level node, in order; the precision pass marked the nodes it saw
    precisions = [node.metadata_props.get(PRECISION_KEY) or config.precision for node in ir_model.graph]

    specs = list(dict.fromkeys(_specs(lowered.graph)))
    selections, tuning = _select_choices(
        specs, device, config, profile_symbols(config, lowered.graph, "opt"), progress
    )
    recipes = {spec: selection.choice.recipe(spec) for spec, selection in selections.items()}

    with phase(progress, "plan"):
        plan = plan_graph(lowered.graph, recipes.__getitem__)
        memory = plan_memory(lowered.graph, profile_symbols(config, lowered.graph, "max"))
        tensors, string_tensors = _split_tensors(lowered)
        manifest = {
            "kiln_version": _version("kiln"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": _target(device),
            "versions": _library_versions(),
            "precision": config.precision,
            "opt_level": config.opt_level,
            "model": {
                "graph_name": ir_model.graph.name,
                "producer": _producer(ir_model),
                "opset_imports": lowered.opset_imports,
            },
            "signature": {
                "inputs": _signature(lowered.graph.inputs, lowered.graph.input_types),
                "outputs": _signature(lowered.graph.outputs, lowered.graph.output_types),
            },
            "plan": plan,
            "memory": memory.to_json(),
            "layers": [
                layer_info(step, recipes[step.spec], precision, selections[step.spec].ms)
                for step, precision in zip(lowered.graph.steps, precisions, strict=True)
            ],
            "string_tensors": string_tensors,
            "debug_outputs": config.debug_outputs,
            "profiles": profiles,
            "build": {"tuning": tuning},
        }
    _record_custom_ops(manifest)
    return EngineData(manifest=manifest, tensors=tensors)


def _fp16_overflow(
    model: ModelSource, config: BuildConfig, calibration: _Calibration,
    progress: ProgressCallback | None,
) -> dict[str, float]:
    """The layers an fp16 build must keep in fp32 for range: layer name -> the largest ``|x|``
    among the float activations it reads or writes, where that exceeds :data:`FP16_RANGE_LIMIT`
    on the calibration data. The layers are those of the model optimized at fp32, which are the
    fp16 build's before its precision pass (that pass only adds Casts and changes types)."""
    with phase(progress, "fp16 range") as current:
        graph_model, _ = optimize(load_onnx(model), config.opt_level, "fp32", config.layer_precisions)
        graph = graph_model.graph
        names = [v.name for v in [*graph.inputs, *(out for node in graph for out in node.outputs)]
                 if v.name and not v.is_initializer() and isinstance(v.type, (ir.TensorType, type(None)))]
        peaks = calibration.peaks(graph_model, names)
        overflow = {}
        for index, node in enumerate(graph):
            name = node.name or f"{node.op_type}_{index}"  # as lowering names the layer
            outputs = [peaks[v.name] for v in node.outputs if v.name in peaks]
            if name in config.layer_precisions or not outputs:
                continue  # already fp32, or computes no float
            inputs = [peaks[v.name] for v in node.inputs if v is not None and v.name in peaks]
            if max(outputs + inputs) > FP16_RANGE_LIMIT:
                overflow[name] = max(outputs + inputs)
        current.detail = "every activation within fp16's range"
        if overflow:
            current.detail = f"{len(overflow)} layer(s) kept in fp32: {', '.join(overflow)}"
    if overflow:
        log.info(
            "fp16: %d layer(s) stay fp32, their activations exceed %g on the calibration data: %s",
            len(overflow), FP16_RANGE_LIMIT,
            ", ".join(f"{name} (|x| up to {peak:.3g})" for name, peak in overflow.items()),
        )
    return overflow


class _Calibration:
    """Observes activations on the calibration data by running an fp32 engine of the optimized
    graph with the activations as extra outputs: their ranges for
    :class:`~kiln.passes.quantize.QuantizeLayers` (from the calibration cache when it holds them),
    and their largest magnitudes for the fp16 range check."""

    def __init__(
        self, config: BuildConfig, device: str, data: CalibrationSource | None,
        run_engine: EngineRunner | None, inputs: list[DeclaredInput],
        progress: ProgressCallback | None,
    ) -> None:
        self.config = config
        self.device = device
        self.data = data
        self.run_engine = run_engine
        self.inputs = inputs
        self.progress = progress

    def measure(self, model: ir.Model, targets: list[str], channel_targets: list[str]) -> Calibrated:
        config = self.config
        method, percentile, fmt = config.calibration_method, config.calibration_percentile, config.precision
        fingerprint = _fingerprint(model, fmt)
        cache = config.calibration_cache
        if cache is not None:
            cached = load_cache(cache, fingerprint, method, percentile, fmt=fmt)
            channels = load_channel_cache(cache, fingerprint)
            if cached is not None and set(targets) <= set(cached) and set(channel_targets) <= set(channels):
                log.info("calibration ranges from %s", cache)
                return Calibrated({name: cached[name] for name in targets},
                                  {name: channels[name] for name in channel_targets})
        if self.data is None or self.run_engine is None:
            first = (targets or channel_targets)[0]
            raise ConfigError(
                f"precision {fmt} needs calibration data (calibration_data= in Python, "
                f"--calibration-data DIR on the command line) or a calibration cache made for this "
                f"model: {len(targets) + len(channel_targets)} layer input(s) need measuring, the "
                f"first {first!r}"
            )
        batches = calibration_batches(self.data, self.inputs, config.calibration_batches)
        collector = RangeCollector()
        maxima: dict[str, torch.Tensor] = {}
        observed = [*targets, *(name for name in channel_targets if name not in targets)]
        with phase(self.progress, "calibration", total=len(batches)) as current:
            for values in self._observe(model, observed, batches):
                for name, value in values.items():
                    value = torch.as_tensor(value)
                    if name in targets:
                        collector.observe(name, value)
                    if name in channel_targets:
                        channel = value.detach().abs().float().reshape(-1, value.shape[-1]).amax(0)
                        maxima[name] = channel if name not in maxima else torch.maximum(maxima[name], channel)
                current.advance()
            measured = Calibrated(
                {name: collector.amax(name, method, percentile, fmt) for name in targets},
                {name: maxima[name].cpu().double().numpy() for name in channel_targets},
            )
            current.detail = (
                f"{len(observed)} activations over {len(batches)} batches ({method})"
            )
        if cache is not None:
            save_cache(cache, fingerprint, method, percentile, measured.ranges, fmt=fmt,
                       channels=measured.channels)
        return measured

    def peaks(self, model: ir.Model, names: list[str]) -> dict[str, float]:
        """The largest finite ``|x|`` each floating-point activation of ``names`` takes on the
        calibration data (activations of other types are left out)."""
        assert self.data is not None and self.run_engine is not None
        batches = calibration_batches(self.data, self.inputs, self.config.calibration_batches)
        peaks: dict[str, float] = {}
        for values in self._observe(model, names, batches):
            for name, value in values.items():
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    value = torch.from_numpy(value)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    finite = value.detach().abs().float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
                    peak = float(finite.amax()) if finite.numel() else 0.0
                    peaks[name] = max(peaks.get(name, 0.0), peak)
        return peaks

    def _observe(
        self, model: ir.Model, names: list[str], batches: list[dict[str, np.ndarray]]
    ) -> Iterator[dict[str, Any]]:
        """Per batch, the value of every activation (or model input) in ``names``, as the engine
        (or the batch) holds it."""
        assert self.run_engine is not None
        run = self.run_engine(self._observing_engine(model, names))
        for batch in batches:
            outputs = run(batch)
            yield {name: batch[name] if name in batch else outputs[name] for name in names}

    def _observing_engine(self, model: ir.Model, targets: list[str]) -> EngineData:
        """An fp32 engine of ``model`` that also outputs the ``targets`` it computes."""
        graph = model.graph
        made = {value.name: value for node in graph for value in node.outputs if value.name}
        exposed = {value.name for value in graph.outputs}
        extra = [made[name] for name in targets if name in made and name not in exposed]
        graph.outputs.extend(extra)
        try:
            return _engine_data(model, BuildConfig(device=self.device, opt_level=0), self.device, None)
        finally:
            for _ in extra:
                graph.outputs.pop()


def _fingerprint(model: ir.Model, precision: str) -> str:
    """Identifies the optimized model a calibration cache measured. The activations measured are
    not part of it: a cache serves every build that needs a subset of them, such as those of the
    same model with more layers pinned to fp32."""
    digest = hashlib.sha256(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    digest.update(json.dumps(precision).encode())
    return digest.hexdigest()


def _declared_inputs(model: ir.Model) -> list[DeclaredInput]:
    """The model's inputs as calibration data must give them."""
    inputs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = None if value.shape is None else tuple(
            d if isinstance(d, int) else str(d) for d in value.shape
        )
        inputs.append(DeclaredInput(value.name or "", value.dtype, shape))
    return inputs


def _check_precision_on(device: str, precision: str) -> None:
    if precision != "fp8" or device != "cuda":
        return
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        name = torch.cuda.get_device_name()
        raise BuildError(
            f"precision fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"{name} is {capability[0]}.{capability[1]}: use int8 or fp16"
        )


def _select_choices(
    specs: list[KernelSpec], device: str, config: BuildConfig, symbols: dict[str, int],
    progress: ProgressCallback | None,
) -> tuple[dict[KernelSpec, Selection], dict[str, Any]]:
    """The chosen kernel of every spec, and a summary of the tuning for the manifest."""
    start = time.perf_counter()
    cache = TimingCache(config.timing_cache)
    tuner = Tuner(
        device, config.opt_level, cache, symbols, target=_tuning_target(device),
        tf32=config.precision == "tf32",
    )
    selections = {}
    with phase(progress, "tuning", total=len(specs)) as current:
        for spec in specs:
            selections[spec] = tuner.select(spec)
            current.advance(spec.op_type)
        timed = sum(1 for s in selections.values() if s.timings and not s.cached)
        current.detail = (
            f"{len(specs)} distinct kernel specs, {timed} timed, {cache.hits} from the timing cache"
        )
    cache.save()
    summary = {
        "specs": len(specs), "timed": timed, "cache_hits": cache.hits,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return selections, summary


def _tuning_target(device: str) -> dict[str, Any]:
    """What a timing depends on besides the spec: the GPU and the software versions."""
    return {**_target(device), **_library_versions(), "kiln": _version("kiln")}


def _check_pinned_layers(config: BuildConfig, graph: LoweredGraph) -> None:
    unknown = sorted(set(config.layer_precisions) - {step.name for step in graph.steps})
    if unknown:
        raise ConfigError(
            f"layer_precisions names unknown layer(s) {', '.join(map(repr, unknown))}; "
            "`kiln inspect ENGINE` lists the layer names"
        )


def _producer(model: ir.Model) -> str:
    return f"{model.producer_name or ''} {model.producer_version or ''}".strip()


def _expose_layer_outputs(graph: ir.Graph) -> None:
    """Make every top-level node's named outputs graph outputs too (after the model's own)."""
    exposed = {value.name for value in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name and value.name not in exposed:
                graph.outputs.append(value)
                exposed.add(value.name)


def _specs(graph: LoweredGraph) -> Iterator[KernelSpec]:
    """Every step's spec, subgraphs included, in execution order."""
    for step in graph.steps:
        yield step.spec
        for encoded in step.attributes.values():
            for subgraph in [encoded["graph"]] if "graph" in encoded else encoded.get("graphs", []):
                yield from _specs(subgraph)


def _split_tensors(lowered: LoweredModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, strings = {}, {}
    for key, array in lowered.tensors.items():
        if array.dtype.kind in "OSU":  # strings: NumPy objects or fixed-width bytes
            values = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
            strings[key] = {"shape": list(array.shape), "values": values}
        else:
            tensors[key] = to_torch(np.asarray(array))
    return tensors, strings


def _signature(names: list[str], types: list[ValueType | None]) -> list[dict[str, Any]]:
    entries = []
    for name, vtype in zip(names, types):
        dtype = element_type(vtype.dtype).name if vtype and vtype.dtype else None
        entries.append(
            {
                "name": name,
                "kind": vtype.kind if vtype else "tensor",
                "dtype": dtype,
                "shape": None if vtype is None or vtype.shape is None else list(vtype.shape),
            }
        )
    return entries


def _target(device: str) -> dict[str, Any]:
    if device == "cpu":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": "cuda",
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _library_versions() -> dict[str, str | None]:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnx": _version("onnx"),
        "onnx_ir": _version("onnx-ir"),
        "triton": _version("triton"),
    }


def _record_custom_ops(manifest: dict[str, Any]) -> None:
    """List the custom ops an engine needs registered where it loads, and mark their layers."""
    used = {
        (step["domain"], step["op"], step["opset"])
        for step in _plan_steps(manifest["plan"])
        if is_custom_op(step["domain"], step["op"])
    }
    manifest["custom_ops"] = [{"domain": d, "op": op, "opset": v} for d, op, v in sorted(used)]
    for layer, step in zip(manifest["layers"], manifest["plan"]["steps"]):
        layer["custom"] = is_custom_op(step["domain"], step["op"])


def _plan_steps(graph: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of a plan graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    steps = []
    for step in graph["steps"]:
        steps.append(step)
        for encoded in step["attributes"].values():
            for subgraph in [encoded["graph"]] if "graph" in encoded else encoded.get("graphs", []):
                steps.extend(_plan_steps(subgraph))
    return steps
