"""int8/fp8 builds on a GPU keep in fp16 the quantized layers that run faster there.

An 8-bit layer is not always the faster one: a layer that quantizes its own input (per row, at
run time: a pass over the activation before its product) can lose to the fp16 product of the
same layer, and then the engine is faster, and no less accurate, with that layer in fp16. As
TensorRT chooses each layer's precision among those allowed by timing them, the build times every
layer of the 8-bit engine and of the fp16 engine of the same model on the device
(:func:`~kiln.runtime.layer_times.layer_times`), pins to fp16 the quantized layers the fp16
engine runs at least :data:`MARGIN` faster (``layer_precisions``), rebuilds, and keeps the rebuilt
engine only when its whole run (with CUDA graphs) is faster too: a layer's time assumes its
neighbours as they are in its engine (an 8-bit layer whose input another hands over in 8 bits
costs little, and pinning that neighbour takes it away).

At ``opt_level`` 3 and above, on cuda, without an accuracy budget (whose search pins layers
itself), unless the configuration turns it off (``fp16_fallback=False``). The rebuilt engine must
run at least :data:`RUN_MARGIN` faster to be kept. The builds share a kernel timing cache and a calibration cache (temporary ones unless
the configuration names its own), so the model is calibrated once. The manifest records what was
compared and kept under ``build.fp16_fallback``; when the comparison itself fails (the model does
not build in fp16, say), the 8-bit engine stands and the record says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.config import QUANTIZED_PRECISIONS, BuildConfig
from kiln.engine.build import build_engine, resolve_device
from kiln.engine.format import EngineData
from kiln.engine.progress import ProgressCallback, phase
from kiln.errors import KilnError
from kiln.precision_search import engine_runner, evaluation_batches
from kiln.runtime import Engine
from kiln.runtime.layer_times import layer_times, run_time

log = logging.getLogger("kiln.precision")
MIN_OPT_LEVEL = 3
MARGIN = 0.1  # a layer goes to fp16 when that is at least 10% faster: not for timing noise
RUN_MARGIN = 0.02  # and the engine with them there when it runs at least 2% faster
QUANTIZED_LAYERS = ("kiln::QuantizedMatMul", "kiln::QuantizedConv")
MANIFEST_KEY = "fp16_fallback"
ITERATIONS, WARMUP = 20, 3


def applies(config: BuildConfig) -> bool:
    """Whether a build of ``config`` compares its quantized layers with fp16."""
    return (
        config.fp16_fallback and config.precision in QUANTIZED_PRECISIONS
        and config.opt_level >= MIN_OPT_LEVEL
        and config.accuracy_budget is None and resolve_device(config.device) == "cuda"
    )


def fp16_faster_layers(
    layers: Sequence[Mapping[str, Any]], quantized_ms: Mapping[str, float], fp16_ms: Mapping[str, float],
) -> list[str]:
    """The quantized ones of ``layers`` (an engine manifest's, in order) that the fp16 engine runs
    at least :data:`MARGIN` faster: layer name -> ms in each engine; layers either lacks are kept."""
    return [
        layer["name"] for layer in layers
        if layer["op"] in QUANTIZED_LAYERS and layer["name"] in quantized_ms and layer["name"] in fp16_ms
        and fp16_ms[layer["name"]] < (1 - MARGIN) * quantized_ms[layer["name"]]
    ]


def build_with_fp16_fallback(
    model: Any, config: BuildConfig, progress: ProgressCallback | None, calibration_data: Any,
) -> EngineData:
    """The engine data of ``model`` at ``config``'s 8-bit precision, its quantized layers that
    run faster in fp16 pinned there when that makes the engine faster."""
    if calibration_data is not None and not isinstance(calibration_data, (str, os.PathLike)):
        calibration_data = list(calibration_data)  # an iterable is read once per build: keep it
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-fallback-")))
        config = config.replace(**{
            option: str(scratch / f"{option}.json")
            for option in ("timing_cache", "calibration_cache") if getattr(config, option) is None
        })
        quantized = build_engine(model, config, progress, calibration_data, engine_runner)
        with phase(progress, "fp16 fallback") as current:
            try:
                chosen, record, current.detail = _fall_back(model, config, calibration_data, quantized)
            except KilnError as error:  # the 8-bit engine stands; only the comparison failed
                chosen, record = quantized, {"error": str(error)}
                current.detail = f"not compared with fp16: {error}"
            log.info("fp16 fallback: %s", current.detail)
        chosen.manifest["build"][MANIFEST_KEY] = record
    return chosen


def _fall_back(
    model: Any, config: BuildConfig, calibration_data: Any, quantized: EngineData,
) -> tuple[EngineData, dict[str, Any], str]:
    """(the engine to keep, what was compared, a summary) for the 8-bit engine ``quantized``."""
    kept_fp32 = {name: kept for name, kept in config.layer_precisions.items() if kept == "fp32"}
    fp16 = build_engine(model, config.replace(precision="fp16", layer_precisions=kept_fp32))
    # one engine each: timing layers runs them eagerly, timing a whole run replays a CUDA graph
    quantized_engine = Engine(quantized)
    feed = _feed(quantized_engine, calibration_data)
    quantized_ms, fp16_ms = _layer_ms(quantized_engine, feed), _layer_ms(Engine(fp16), feed)
    faster = fp16_faster_layers(quantized.manifest["layers"], quantized_ms, fp16_ms)
    record: dict[str, Any] = {"layers": {
        name: {config.precision: round(quantized_ms[name], 6), "fp16": round(fp16_ms[name], 6)}
        for name in faster
    }}
    if not faster:
        return quantized, record, f"every quantized layer is faster in {config.precision}"
    pinned = config.replace(layer_precisions={**dict.fromkeys(faster, "fp16"), **kept_fp32})
    rebuilt = build_engine(model, pinned, None, calibration_data, engine_runner)
    as_built, with_fp16 = (run_time(engine, feed) * 1e3 for engine in (quantized_engine, Engine(rebuilt)))
    kept = with_fp16 < (1 - RUN_MARGIN) * as_built
    record.update(run_ms={"as_built": round(as_built, 6), "with_fp16": round(with_fp16, 6)}, kept=kept)
    summary = (
        f"{len(faster)} layer(s) faster in fp16; the engine with them in fp16 runs in "
        f"{with_fp16:.3f} ms, as built {as_built:.3f} ms: "
        f"{'kept in fp16' if kept else 'left in ' + config.precision}"
    )
    return (rebuilt if kept else quantized), record, summary


def _feed(engine: Engine, calibration_data: Any) -> dict[str, torch.Tensor]:
    """The first evaluation batch (see :func:`~kiln.precision_search.evaluation_batches`) on the
    engine's device."""
    batch = evaluation_batches(engine.inputs, engine.profiles, calibration_data)[0]
    return {name: torch.as_tensor(array).to(engine.device) for name, array in batch.items()}


def _layer_ms(engine: Engine, feed: Mapping[str, torch.Tensor]) -> dict[str, float]:
    seconds = layer_times(engine, feed, ITERATIONS, WARMUP)
    return {layer["name"]: s * 1e3 for layer, s in zip(engine.layers, seconds, strict=True)}
