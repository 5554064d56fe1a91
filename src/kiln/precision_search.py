"""Building under an accuracy budget: the fewest layers kept in fp32, and the ``best`` policy.

An engine built at a reduced precision (fp16, bf16, int8, fp8) is measured against the FP32
model in ONNX Runtime on the evaluation data (:func:`evaluation_batches`: the calibration data
when given, else fixed random inputs). When it misses the budget, the layers the build narrowed
are ordered by sensitivity and the smallest most-sensitive prefix that meets the budget is kept
in fp32, found by bisection: about log2(N) builds for N layers, not N.

Sensitivity is the error a layer adds, measured once on two engines built with
``debug_outputs`` (every layer's outputs exposed): the narrowed one and an fp32 one, run on the
same data. Each value's error is its relative L2 distance from the fp32 engine's value of the same
name; a layer's sensitivity is the error of its outputs less the largest error of its inputs. It
costs two builds and one pass over the data, and it blames the layer where the error appears
rather than every layer downstream that carries it on (as an output's error alone would).
Bisecting over that order assumes that keeping more layers in fp32 does not lose accuracy.

``best`` builds the precisions that can be fast on the device, fastest first: on cuda fp8 (compute
capability 8.9 and newer), int8, fp16, bf16, tf32 and fp32; on the CPU bf16 and fp32 only (int8
and fp8 layers run there as fake quantization in float32 and fp16 has no fast CPU kernels, so
none of them can beat fp32; tf32 is fp32 there). int8 and fp8 need calibration data or a
calibration cache and are left out without one. Each precision's engine is timed (median of runs
on the first evaluation batch) and searched as above; the fastest that meets the budget wins. A
precision whose engine is slower before any layer is pinned than one that already met the budget
is not searched (keeping layers in fp32 does not make an engine faster), and one that meets the
budget only with every candidate layer in fp32 does not count (that is the fp32 engine).

The builds of one search share a kernel timing cache and a calibration cache (temporary ones
unless the configuration names its own): every build after the first reuses their measurements.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from kiln.config import BEST, AccuracyBudget, BuildConfig, Profile
from kiln.engine.build import build_engine, resolve_device
from kiln.engine.calibration_data import CalibrationSource, calibration_batches
from kiln.engine.format import EngineData
from kiln.engine.progress import Phase, ProgressCallback, phase
from kiln.errors import BuildError, ConfigError, InputError
from kiln.frontend.onnx import ModelSource
from kiln.runtime import Engine, TensorInfo
from kiln.runtime.accuracy import OutputAccuracy, accuracy_report, onnxruntime_reference
from kiln.runtime.layer_times import run_time

log = logging.getLogger("kiln.precision")

EVALUATION_BATCHES = 8
SEARCHABLE = ("fp16", "bf16", "int8", "fp8")  # the precisions whose layers can be pinned to fp32
BEST_CANDIDATES = {"cuda": ("fp8", "int8", "fp16", "bf16", "tf32", "fp32"), "cpu": ("bf16", "fp32")}
FP8_CAPABILITY = (8, 9)
MANIFEST_KEY = "accuracy_budget"
_ERROR_CAP = 1e30  # a value's relative error when it is not finite (an overflow): huge, but subtractable


def engine_runner(data: EngineData) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    """Runs the engine of ``data`` on batches, keeping its outputs on the engine's device: how the
    builder runs the engines it calibrates with."""
    engine = Engine(data, cuda_graphs=False)

    def run(batch: Mapping[str, Any]) -> Mapping[str, Any]:
        return engine.run({name: torch.as_tensor(array).to(engine.device) for name, array in batch.items()})

    return run


def evaluation_batches(
    inputs: Sequence[TensorInfo], profiles: Sequence[Profile] = (),
    calibration_data: CalibrationSource | None = None,
) -> list[dict[str, np.ndarray]]:
    """The data accuracy is measured on: up to :data:`EVALUATION_BATCHES` batches of the
    calibration data, else as many batches of random inputs from a generator seeded with 0 (as
    ``kiln run`` makes them: floats standard normal, integers 0 to 9; symbolic dimensions at the
    first profile's opt shapes, else 1)."""
    if calibration_data is not None:
        return calibration_batches(calibration_data, inputs, limit=EVALUATION_BATCHES)
    shapes = {name: ranges[1] for name, ranges in profiles[0].shapes.items()} if profiles else {}
    rng = np.random.default_rng(0)
    return [{info.name: _random_input(info, shapes, rng) for info in inputs} for _ in range(EVALUATION_BATCHES)]


def _random_input(info: TensorInfo, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> Any:
    dtype = np.dtype(info.dtype or "float32") if info.dtype != "string" else np.dtype(object)
    if info.kind != "tensor" or dtype.kind == "O" or (info.shape is None and info.name not in shapes):
        raise InputError(
            f"input {info.name!r} ({info.describe()}) cannot be made up at random; measuring "
            "accuracy on it needs calibration data"
        )
    shape = shapes.get(info.name) or tuple(d if isinstance(d, int) else 1 for d in info.shape or ())
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def budget_values(outputs: Sequence[OutputAccuracy]) -> dict[str, float]:
    """The value of each budget metric over every output: the lowest worst-sample cosine and
    top-1 agreement (of outputs shaped like class scores; absent when there are none), the
    largest absolute and relative errors."""
    values = {
        "cosine": min(output.worst_sample_cosine for output in outputs),
        "max_abs": max(output.max_abs for output in outputs),
        "max_rel": max(output.max_rel for output in outputs),
    }
    top1 = [output.top1_agreement for output in outputs if output.top1_agreement is not None]
    if top1:
        values["top1"] = min(top1)
    return values


def describe_values(budget: AccuracyBudget, values: Mapping[str, float]) -> str:
    """``"cosine 0.99912, top1 1"``: the values of the budget's metrics."""
    return ", ".join(f"{term.metric} {values[term.metric]:.6g}" for term in budget.terms)


@dataclass
class PrecisionSearch:
    """What a search for the layers to keep in fp32 found, at one precision.

    ``pinned``: the layers kept in fp32 (most sensitive first), the fewest that meet the budget
    along the sensitivity order; empty when the budget holds as built or cannot be met.
    ``candidates``: the layers the build narrowed, which the search could keep in fp32, most
    sensitive first once ranked. ``values``: the budget's metrics (see :func:`budget_values`) of
    the engine that meets the budget, or, when none does, of the closest tried (every candidate
    in fp32). ``builds``: the engines built. ``data``: the engine that meets the budget.
    """

    precision: str
    budget: AccuracyBudget
    met: bool
    pinned: list[str]
    candidates: list[str]
    values: dict[str, float]
    builds: int
    data: EngineData | None = field(default=None, repr=False)

    def layer_precision_args(self) -> str:
        """The pinned layers as ``kiln build`` takes them: ``--layer-precision NAME=fp32 ...``."""
        return " ".join(f"--layer-precision {name}=fp32" for name in self.pinned)

    def describe(self) -> str:
        reached = describe_values(self.budget, self.values)
        if not self.met:
            return f"{self.precision} misses {self.budget} ({reached})"
        kept = f"{len(self.pinned)} of {len(self.candidates)} layers in fp32" if self.pinned else "no layer in fp32"
        return f"{self.precision} meets {self.budget} with {kept} ({reached})"

    def failure(self) -> str:
        """Why the budget cannot be met at this precision, naming the layers tried."""
        reached = describe_values(self.budget, self.values)
        if not self.candidates:
            return (
                f"the {self.precision} engine misses the accuracy budget {self.budget}: it reaches "
                f"{reached}, and it has no layer in a reduced precision to keep in fp32"
            )
        names = ", ".join(self.candidates[:12]) + (", ..." if len(self.candidates) > 12 else "")
        return (
            f"the {self.precision} engine misses the accuracy budget {self.budget} even with all "
            f"{len(self.candidates)} layers it narrowed kept in fp32 ({names}): the closest it "
            f"comes is {reached}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "budget": str(self.budget), "met": self.met,
            "pinned": self.pinned, "candidates": self.candidates, "values": self.values,
            "builds": self.builds,
        }


def search_layer_precisions(
    model: ModelSource, config: BuildConfig, progress: ProgressCallback | None = None,
    calibration_data: CalibrationSource | Iterable[Mapping[str, Any]] | None = None,
) -> PrecisionSearch:
    """The fewest layers to keep in fp32 for the engine of ``model`` at ``config.precision``
    (one of :data:`SEARCHABLE`) to meet ``config.accuracy_budget``. Not meeting it is a result
    (``met`` False), not an error."""
    if config.precision not in SEARCHABLE or config.accuracy_budget is None:
        raise ConfigError(
            f"a layer precision search takes a precision among {', '.join(SEARCHABLE)} and an "
            f"accuracy budget, not precision {config.precision!r} and budget {config.accuracy_budget}"
        )
    with _Trials(model, config, calibration_data, progress) as trials:
        found = _search(trials, trials.config)
        trials.phase.detail = found.describe()
    return found


def build_within_budget(
    model: ModelSource, config: BuildConfig, progress: ProgressCallback | None = None,
    calibration_data: CalibrationSource | Iterable[Mapping[str, Any]] | None = None,
) -> EngineData:
    """The engine data of ``model`` at ``config.precision`` (or, for ``"best"``, the fastest
    precision) meeting ``config.accuracy_budget`` with the fewest layers kept in fp32. The
    manifest records the search under ``"accuracy_budget"``. The builds report to ``progress`` as
    one ``budget`` phase, an advance per engine measured. Raises :class:`BuildError` when no
    engine meets the budget."""
    assert config.accuracy_budget is not None
    with _Trials(model, config, calibration_data, progress) as trials:
        if config.precision == BEST:
            found, tried = _best(trials)
        else:
            found, tried = _search(trials, trials.config), None
            if not found.met:
                raise BuildError(found.failure())
        trials.phase.detail = found.describe() + f", {trials.builds} builds"
    assert found.data is not None
    record = {**found.to_json(), "builds": trials.builds}
    if tried is not None:
        record["best"] = tried
    found.data.manifest[MANIFEST_KEY] = record
    return found.data


class _Trials:
    """Builds engines of one model and measures them against FP32 on the same data, reporting
    each measurement as an advance of the ``budget`` build phase."""

    def __init__(
        self, model: ModelSource, config: BuildConfig, calibration_data: Any,
        progress: ProgressCallback | None,
    ) -> None:
        self.model = model
        self.budget = config.accuracy_budget
        # An iterable is read once per build: keep its batches.
        self.calibration_data = (
            calibration_data if calibration_data is None or isinstance(calibration_data, (str, os.PathLike))
            else list(calibration_data)
        )
        self.config = config.replace(  # each trial names its precision; "best" is no precision
            device=resolve_device(config.device), accuracy_budget=None,
            precision="fp32" if config.precision == BEST else config.precision,
        )
        self.progress = progress
        self.builds = 0
        self._stack = contextlib.ExitStack()
        self._reference = onnxruntime_reference(_reference_model(model))
        self._batches: list[dict[str, np.ndarray]] | None = None
        self._expected: list[Mapping[str, Any]] = []
        self._exact_debug: EngineData | None = None

    def __enter__(self) -> _Trials:
        scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-budget-")))
        caches = {
            option: str(scratch / f"{option}.json")
            for option in ("timing_cache", "calibration_cache") if getattr(self.config, option) is None
        }
        self.config = self.config.replace(**caches)
        self.phase: Phase = self._stack.enter_context(phase(self.progress, "budget"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    @property
    def has_calibration(self) -> bool:
        return self.calibration_data is not None or (
            self.config.calibration_cache is not None and Path(self.config.calibration_cache).is_file()
        )

    def build(self, config: BuildConfig) -> EngineData:
        self.builds += 1
        return build_engine(self.model, config, None, self.calibration_data, engine_runner)

    def measure(self, data: EngineData, label: str) -> dict[str, float]:
        """The budget's metrics of the engine of ``data``, reported with ``label``."""
        engine = Engine(data, cuda_graphs=False)
        batches = self.batches(engine)
        replies = iter(self._expected)
        outputs = [info.name for info in engine.outputs]
        values = budget_values(accuracy_report(engine.run, lambda _: next(replies), batches, outputs))
        missing = [term.metric for term in self.budget.terms if term.metric not in values]
        if missing:
            raise ConfigError(
                f"the accuracy budget bounds {missing[0]}, which only outputs shaped like class "
                f"scores ([batch, classes]) have; this model's outputs are {', '.join(outputs)}"
            )
        verdict = "meets" if self.budget.holds(values) else "misses"
        message = f"{label}: {describe_values(self.budget, values)} ({verdict} {self.budget})"
        log.info(message)
        self.phase.advance(message)
        return values

    def batches(self, engine: Engine) -> list[dict[str, np.ndarray]]:
        """The evaluation data, made (and the FP32 reference run on it) on first use."""
        if self._batches is None:
            self._batches = evaluation_batches(engine.inputs, engine.profiles, self.calibration_data)
            self._expected = [self._reference(batch) for batch in self._batches]
        return self._batches

    def exact_debug(self) -> EngineData:
        """The fp32 engine with every layer's outputs exposed, the reference of sensitivities."""
        if self._exact_debug is None:
            self._exact_debug = self.build(
                self.config.replace(precision="fp32", layer_precisions={}, debug_outputs=True)
            )
        return self._exact_debug


def _reference_model(model: ModelSource) -> str | os.PathLike | bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytearray, memoryview)):
        return bytes(model)
    return model


def _search(
    trials: _Trials, config: BuildConfig, first: tuple[EngineData, dict[str, float]] | None = None
) -> PrecisionSearch:
    """Search at ``config.precision``; ``first``: its engine as built and its measurement, when
    the caller has them."""
    budget = trials.budget
    start = trials.builds - (first is not None)  # the caller's build counts as this search's
    if first is None:
        data = trials.build(config)
        first = data, trials.measure(data, config.precision)
    data, values = first
    candidates = _candidates(data)

    def result(met: bool, pinned: list[str], values: dict[str, float], data: EngineData | None) -> PrecisionSearch:
        return PrecisionSearch(config.precision, budget, met, pinned, candidates, values,
                               trials.builds - start, data)

    if budget.holds(values):
        return result(True, [], values, data)
    if not candidates:
        return result(False, [], values, None)
    candidates = _sensitivity_order(trials, config, candidates)
    data = trials.build(_pinned(config, candidates))
    values = trials.measure(data, f"{config.precision}, all {len(candidates)} narrowed layers in fp32")
    if not budget.holds(values):
        return result(False, [], values, None)
    low, high = 0, len(candidates)  # the first `low` layers in fp32 miss the budget, `high` meet it
    while high - low > 1:
        middle = (low + high) // 2
        trial = trials.build(_pinned(config, candidates[:middle]))
        trial_values = trials.measure(trial, f"{config.precision}, {middle} layers in fp32")
        if budget.holds(trial_values):
            high, data, values = middle, trial, trial_values
        else:
            low = middle
    return result(True, candidates[:high], values, data)


def _best(trials: _Trials) -> tuple[PrecisionSearch, list[dict[str, Any]]]:
    """The search of the fastest precision that meets the budget (see the module's docstring),
    and what was tried: per precision, its search and time, or why it was left out."""
    fastest: tuple[float, PrecisionSearch] | None = None
    tried: list[dict[str, Any]] = []
    for precision, unavailable in _best_candidates(trials):
        if unavailable:
            tried.append({"precision": precision, "skipped": unavailable})
            log.info("best: %s left out: %s", precision, unavailable)
            continue
        config = trials.config.replace(precision=precision)
        data = trials.build(config)
        ms = _latency_ms(data, trials)
        if fastest is not None and ms >= fastest[0]:
            tried.append({"precision": precision, "ms": ms,
                          "skipped": f"slower than {fastest[1].precision} before any layer is pinned"})
            continue
        search = _search(trials, config, (data, trials.measure(data, f"{precision} ({ms:.3g} ms)")))
        entry: dict[str, Any] = {**search.to_json(), "ms": ms}
        if not search.met:
            entry["skipped"] = "misses the budget"
        elif search.pinned and len(search.pinned) == len(search.candidates):
            entry["skipped"] = "meets the budget only with every narrowed layer in fp32"
        else:
            if search.pinned:
                assert search.data is not None
                entry["ms"] = ms = _latency_ms(search.data, trials)
            if fastest is None or ms < fastest[0]:
                fastest = ms, search
        tried.append(entry)
    if fastest is None:
        missed = "; ".join(f"{entry['precision']}: {entry['skipped']}" + (
            f" ({describe_values(trials.budget, entry['values'])})" if "values" in entry else ""
        ) for entry in tried)
        raise BuildError(f"no precision meets the accuracy budget {trials.budget}: {missed}")
    ms, found = fastest
    log.info("best: %s, %.3g ms", found.describe(), ms)
    return found, tried


def _best_candidates(trials: _Trials) -> list[tuple[str, str]]:
    """The precisions ``best`` tries on the device, fastest first, each with why it cannot be
    tried here ("" when it can)."""
    device = trials.config.device
    assert device is not None
    candidates = []
    for precision in BEST_CANDIDATES[device]:
        unavailable = ""
        if precision == "fp8" and torch.cuda.get_device_capability() < FP8_CAPABILITY:
            unavailable = "needs a GPU of compute capability 8.9 or newer"
        elif precision in ("int8", "fp8") and not trials.has_calibration:
            unavailable = "needs calibration data"
        candidates.append((precision, unavailable))
    return candidates


def _latency_ms(data: EngineData, trials: _Trials) -> float:
    """The median time of a run of the engine of ``data`` on the first evaluation batch, on its
    device (with CUDA graphs, as it will run)."""
    engine = Engine(data)
    feed = {name: torch.as_tensor(array).to(engine.device) for name, array in trials.batches(engine)[0].items()}
    return run_time(engine, feed) * 1e3


def _pinned(config: BuildConfig, layers: Sequence[str]) -> BuildConfig:
    return config.replace(layer_precisions={**config.layer_precisions, **dict.fromkeys(layers, "fp32")})


def _candidates(data: EngineData) -> list[str]:
    """The layers the build narrowed, in execution order: those not in fp32, but the Casts the
    precision pass adds (which follow the layers around them)."""
    return [
        layer["name"] for layer in data.manifest["layers"]
        if layer["precision"] not in ("fp32", "tf32") and layer["op"] != "Cast"
    ]


def _sensitivity_order(trials: _Trials, config: BuildConfig, candidates: list[str]) -> list[str]:
    """``candidates``, the layer that adds the most error first (see the module's docstring)."""
    narrowed = trials.build(config.replace(debug_outputs=True))
    errors = _value_errors(narrowed, trials.exact_debug(), trials)
    added = {}
    for step in narrowed.manifest["plan"]["steps"]:
        outputs = [errors[name] for name in step["outputs"] if name in errors]
        inputs = [errors[name] for name in step["inputs"] if name in errors]
        added[step["name"]] = max(outputs, default=0.0) - max(inputs, default=0.0)
    order = sorted(candidates, key=lambda name: -added.get(name, 0.0))  # ties in execution order
    log.info(
        "%s: layers by the error they add: %s", config.precision,
        ", ".join(f"{name} {added.get(name, 0.0):.3g}" for name in order),
    )
    return order


def _value_errors(narrowed: EngineData, exact: EngineData, trials: _Trials) -> dict[str, float]:
    """Every value the narrowed engine outputs -> its relative L2 error against the fp32
    engine's value of the same name over the evaluation data (model inputs have none)."""
    ours, theirs = Engine(narrowed, cuda_graphs=False), Engine(exact, cuda_graphs=False)
    chains = _cast_chains(narrowed)
    squared_error: dict[str, float] = {}
    squared_norm: dict[str, float] = {}
    for batch in trials.batches(ours):
        feed = {name: torch.as_tensor(array).to(ours.device) for name, array in batch.items()}
        reference = {**feed, **theirs.run(feed)}
        for name, value in ours.run(feed).items():
            expected = next((reference[n] for n in chains.get(name, [name]) if n in reference), None)
            if not _comparable(value, expected):
                continue
            value, expected = value.double(), expected.double()
            squared_error[name] = squared_error.get(name, 0.0) + float(((value - expected) ** 2).sum())
            squared_norm[name] = squared_norm.get(name, 0.0) + float((expected ** 2).sum())
    errors = {}
    for name, total in squared_error.items():
        error = math.sqrt(total) / max(math.sqrt(squared_norm[name]), 1e-30)
        errors[name] = min(error, _ERROR_CAP) if math.isfinite(error) else _ERROR_CAP
    return errors


def _comparable(value: Any, expected: Any) -> bool:
    return (
        isinstance(value, torch.Tensor) and isinstance(expected, torch.Tensor)
        and value.is_floating_point() and expected.is_floating_point() and value.shape == expected.shape
    )


def _cast_chains(data: EngineData) -> dict[str, list[str]]:
    """Value name -> the names of the values it equals up to Casts: the narrowed engine's copies
    of a value in another type (a model input cast to fp16; an output whose fp32 copy took its
    name), one of which the fp32 engine has."""
    chains: dict[str, list[str]] = {}
    for step in data.manifest["plan"]["steps"]:
        if step["op"] != "Cast" or step["domain"] or not step["inputs"][0] or not step["outputs"][0]:
            continue
        source, copy = step["inputs"][0], step["outputs"][0]
        chain = chains.get(source, [source])
        chain += [name for name in chains.get(copy, [copy]) if name not in chain]
        for name in chain:
            chains[name] = chain
    return chains
