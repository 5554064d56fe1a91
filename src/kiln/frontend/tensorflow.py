"""TensorFlow and Keras -> ONNX through tf2onnx (the optional extra ``kiln[tensorflow]``).

Every kind of model converts as a ``tf.function`` with an input signature, through
``tf2onnx.convert.from_function``: a SavedModel directory through its serving signature, a Keras
model through its ``keras.Input`` specs (tf2onnx's ``from_keras`` does not handle Keras 3), a
``tf.function`` through its own signature. Inputs keep the signature's names; outputs are named
as a SavedModel's signature names them (``output_0``, ...). Layouts stay as TensorFlow has them
(NHWC images).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from kiln.errors import ModelError

SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"
INSTALL_HINT = "pip install 'kiln[tensorflow]'"


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a SavedModel directory."""
    return Path(path).is_dir() and (Path(path) / SAVED_MODEL_FILE).is_file()


def tensorflow_to_onnx(
    model: str | os.PathLike | Any,
    input_signature: Sequence[Any] | None = None,
    *,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Convert a SavedModel directory, a Keras model or a ``tf.function`` to ONNX.

    ``input_signature`` (``tf.TensorSpec`` per input) is needed only where the model has none of
    its own; for a SavedModel it overrides the serving signature's shapes, input by input.
    """
    is_path = isinstance(model, (str, os.PathLike))
    if is_path and not is_saved_model(model):
        raise ModelError(f"{model}: not a SavedModel directory (it holds no {SAVED_MODEL_FILE})")
    tf, convert = import_tensorflow()
    if is_path:
        label = str(model)
        loaded = tf.saved_model.load(label)  # kept alive here while the conversion reads it
        function, specs = _serving_function(tf, loaded, input_signature, label)
    else:
        label = getattr(model, "name", None) or type(model).__name__
        function, specs = _model_function(tf, model, input_signature, label)
    try:
        proto, _ = convert.from_function(function, input_signature=specs, opset=opset)
    except Exception as error:  # TensorFlow and tf2onnx raise many types; all mean the same here
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"tf2onnx cannot convert {label}: {first_line}") from error
    _freeze_captured_tensors(tf, proto, function.get_concrete_function(*specs))
    return proto


def import_tensorflow() -> tuple[Any, Any]:
    """TensorFlow and tf2onnx's converter, or a ModelError saying how to install them."""
    # TensorFlow and Triton each carry LLVM: Triton loaded after TensorFlow aborts the process
    # ("Option ... registered more than once"), the other order works. Torch loads Triton lazily
    # (torch.export, torch.compile, kiln's kernels), so it is loaded here, first.
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    try:
        import tensorflow as tf
        import tf2onnx.convert
    except ImportError as error:
        raise ModelError(
            f"TensorFlow models convert through TensorFlow and tf2onnx, which are not installed "
            f"({error}); install them with {INSTALL_HINT}"
        ) from None
    return tf, tf2onnx.convert


def _freeze_captured_tensors(tf: Any, proto: onnx.ModelProto, concrete: Any) -> None:
    """Turn the graph inputs tf2onnx leaves for tensors the function captured by value (variables
    it freezes; eager constants it does not) into initializers holding those values."""
    captured = concrete.captured_inputs
    placeholders = concrete.inputs[len(concrete.inputs) - len(captured):]
    values = {
        placeholder.name: value for placeholder, value in zip(placeholders, captured)
        if value.dtype != tf.resource
    }
    inputs = list(proto.graph.input)
    del proto.graph.input[:]
    for value_info in inputs:
        if value_info.name in values:
            array = values[value_info.name].numpy()
            proto.graph.initializer.append(numpy_helper.from_array(array, value_info.name))
        else:
            proto.graph.input.append(value_info)


def _serving_function(
    tf: Any, loaded: Any, input_signature: Sequence[Any] | None, label: str
) -> tuple[Any, list[Any]]:
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if not signatures:
        raise ModelError(
            f"{label}: the SavedModel has no serving signature; save it with Keras's model.export() "
            "or tf.saved_model.save(..., signatures=...)"
        )
    serving = signatures.get(SERVING_SIGNATURE) or next(iter(signatures.values()))
    _, specs_by_name = serving.structured_input_signature
    names = list(specs_by_name)
    given = list(input_signature) if input_signature is not None else [specs_by_name[n] for n in names]
    if len(given) != len(names):
        raise ModelError(
            f"{label}: input_signature has {len(given)} specs, the serving signature takes "
            f"{len(names)} inputs ({', '.join(names)})"
        )
    specs = [tf.TensorSpec(spec.shape, spec.dtype, name=name) for name, spec in zip(names, given)]

    def serve(*inputs: Any) -> Any:
        return serving(**dict(zip(names, inputs)))

    return tf.function(serve, input_signature=specs), specs


def _model_function(
    tf: Any, model: Any, input_signature: Sequence[Any] | None, label: str
) -> tuple[Any, list[Any]]:
    is_tf_function = hasattr(model, "get_concrete_function")
    declared = getattr(model, "input_signature", None) if is_tf_function else _keras_specs(tf, model)
    specs = list(input_signature if input_signature is not None else declared or [])
    if not specs:
        raise ModelError(
            f"{label} declares no inputs; pass input_signature=[tf.TensorSpec(shape, dtype, name), ...]"
        )

    def call(*inputs: Any) -> Any:
        if is_tf_function:
            return _named_outputs(model(*inputs))
        # A Keras model takes several inputs as one list, and runs in inference mode here.
        return _named_outputs(model(inputs[0] if len(inputs) == 1 else list(inputs), training=False))

    return tf.function(call, input_signature=specs), specs


def _keras_specs(tf: Any, model: Any) -> list[Any] | None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model that was never built on inputs
        return None
    return [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in inputs or []]


def _named_outputs(result: Any) -> dict[str, Any]:
    """Outputs as a dict, which tf2onnx names by key, like a SavedModel's signature."""
    if isinstance(result, dict):
        return result
    if isinstance(result, (list, tuple)):
        return {f"output_{i}": value for i, value in enumerate(result)}
    return {"output_0": result}
