"""kiln: an inference optimizer and runtime for NVIDIA GPUs. ONNX in, fast engine out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from kiln import errors
from kiln.config import AccuracyBudget, BuildConfig, Profile
from kiln.engine.progress import ProgressCallback, ProgressEvent
from kiln.frontend.onnx import ModelSource
from kiln.ops.custom import custom_op
from kiln.runtime import Engine, TensorInfo, Timeline, load
from kiln.runtime.module import CALL_KEY, CompiledModule, load_module

if TYPE_CHECKING:
    from kiln.engine.format import EngineData

__all__ = [
    "AccuracyBudget", "BuildConfig", "CompiledModule", "Engine", "Profile", "ProgressEvent", "TensorInfo",
    "Timeline", "build", "compile", "custom_op", "errors", "from_tensorflow", "load", "load_module",
]
__version__ = "0.1.0"


def build(
    model: ModelSource,
    config: BuildConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    calibration_data: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None,
    **overrides: object,
) -> Engine:
    """Build an engine from an ONNX model (a path, bytes or ``onnx.ModelProto``).

    Options come from ``config`` (a :class:`BuildConfig`) with keyword ``overrides`` on top, for
    example ``kiln.build("model.onnx", device="cpu")``. ``progress`` receives a
    :class:`ProgressEvent` as each build phase starts, advances and ends.
    ``calibration_data`` (for ``precision="int8"`` or ``"fp8"``; under ``"fp16"`` it finds the
    layers whose activations leave fp16's range, and under an accuracy budget it is the data
    accuracy is measured on): a directory of ``.npz`` files (one batch each, arrays by input
    name; ``.npy`` for one-input models) or an iterable of dicts of input name to array.
    ``accuracy_budget="cosine>=0.999"`` (with ``precision=`` a reduced precision or ``"best"``)
    keeps the fewest layers in fp32 that meet the budget (see :mod:`kiln.precision_search`).
    int8/fp8 builds on a GPU keep in fp16 the layers that run faster there (see
    :mod:`kiln.fp16_fallback`).
    """
    config = (config or BuildConfig()).replace(**overrides)
    return Engine(_build_engine_data(model, config, progress, calibration_data))


def compile(  # noqa: A001  (kiln.compile, as torch.compile)
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    config: BuildConfig | None = None,
    progress: ProgressCallback | None = None,
    **overrides: object,
) -> CompiledModule:
    """Compile a PyTorch module into an engine, returned as a module called like the original.

    ``example_inputs`` is the one argument, or a tuple of the positional arguments, of an example
    call (``example_kwargs`` its keyword arguments). The module is exported with them through
    ``torch.onnx.export(dynamo=True)`` (the TorchScript exporter where that fails, with a log
    warning) and built as :func:`build` does, for the example inputs' device unless ``device`` is
    given. Every dimension is fixed at the example's except those ``dynamic_shapes`` names, in
    torch.export's form with names allowed for ``torch.export.Dim``: ``{"x": {0: "batch"}}``.
    A module that cannot be exported raises :class:`~kiln.errors.ModelError` naming the operator
    or the line of Python the exporter stopped at.
    """
    from kiln.frontend.torch import export_module  # the compiler loads only when building

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    config = (config or BuildConfig()).replace(**overrides)
    if config.device is None:
        on_cuda = any(
            isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in pytree.tree_leaves((args, kwargs))
        )
        config = config.replace(device="cuda" if on_cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="kiln-export-") as directory:
        model_path, call = export_module(module, args, kwargs, dynamic_shapes, Path(directory))
        data = _build_engine_data(model_path, config, progress, None)
    stored_call = call.to_json()
    if stored_call is not None:  # otherwise the module runs but cannot be saved (save() says why)
        data.manifest[CALL_KEY] = stored_call
    return CompiledModule(Engine(data), call)


def from_tensorflow(
    model: str | os.PathLike | Any,
    input_signature: Sequence[Any] | None = None,
    config: BuildConfig | None = None,
    *,
    opset: int | None = None,
    progress: ProgressCallback | None = None,
    **overrides: object,
) -> Engine:
    """Build an engine from a TensorFlow SavedModel directory, a Keras model or a ``tf.function``.

    The model converts to ONNX through tf2onnx (``pip install 'kiln[tensorflow]'``);
    ``input_signature`` is a list of ``tf.TensorSpec`` (a Keras model built on ``keras.Input``
    and a SavedModel's serving signature have their own). Options as for :func:`build`.
    """
    from kiln.frontend.tensorflow import tensorflow_to_onnx  # TensorFlow loads only when asked

    onnx_model = tensorflow_to_onnx(model, input_signature, opset=opset)
    return build(onnx_model, config, progress=progress, **overrides)


def _build_engine_data(
    model: ModelSource, config: BuildConfig, progress: ProgressCallback | None,
    calibration_data: Any,
) -> EngineData:
    # the compiler loads only when building
    from kiln import fp16_fallback
    from kiln.engine.build import build_engine
    from kiln.precision_search import build_within_budget, engine_runner

    if config.accuracy_budget is not None:
        return build_within_budget(model, config, progress, calibration_data)
    if fp16_fallback.applies(config):
        return fp16_fallback.build_with_fp16_fallback(model, config, progress, calibration_data)
    return build_engine(model, config, progress, calibration_data, engine_runner)
