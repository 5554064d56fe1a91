"""Load and validate an ONNX model, then convert it to onnx_ir.

Accepts a path, the serialized bytes, or an ``onnx.ModelProto``. External data must live inside
the model's folder: absolute locations, ``..`` escapes and symbolic links are refused, so a model
file cannot make kiln read arbitrary files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from kiln.errors import ModelError

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


def read_onnx(model: ModelSource) -> onnx.ModelProto:
    """Parse and check ``model``; external data is loaded from the model's folder."""
    if isinstance(model, onnx.ModelProto):
        proto, base_dir, label = model, None, "the ONNX model"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto, base_dir, label = _parse(bytes(model), "the ONNX model bytes"), None, "ONNX bytes"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            raise ModelError(
                f"{path}: a directory, not an ONNX file (a TensorFlow SavedModel directory needs "
                "saved_model.pb)"
            )
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        proto, base_dir, label = _parse(path.read_bytes(), str(path)), path.parent, str(path)
    else:
        raise ModelError(
            f"expected a model path, bytes or onnx.ModelProto, got {type(model).__name__}"
        )
    _load_external_data(proto, base_dir, label)
    _check(proto, label)
    return proto


def load_onnx(model: ModelSource) -> ir.Model:
    """Read ``model`` (see :func:`read_onnx`) and convert it to onnx_ir."""
    return ir.serde.deserialize_model(read_onnx(model))


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelError(
            f"{label} is not a valid ONNX model (the protobuf does not parse: {error}); "
            "the file may be truncated or of another format"
        ) from None
    # Protobuf parsing is lenient: bytes of another format can parse into an empty message.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelError(
            f"{label} is not an ONNX model (no IR version or graph); export it with an ONNX exporter"
        )
    return proto


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _load_external_data(proto: onnx.ModelProto, base_dir: Path | None, label: str) -> None:
    tensors = _external_tensors(proto)
    if not tensors:
        return
    if base_dir is None:
        raise ModelError(
            f"{label} refers to external data ({tensors[0].name!r}) but was not given as a path; "
            "pass the model's file path so kiln can find its data files"
        )
    root = base_dir.resolve()
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        _check_location(location, base_dir, root, tensor.name, label)
    try:
        external_data_helper.load_external_data_for_model(proto, str(base_dir))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"{label}: cannot read external data: {error}") from None


def _check_location(location: str, base_dir: Path, root: Path, tensor: str, label: str) -> None:
    refused = f"{label}: external data of tensor {tensor!r} at {location!r}"
    if not location or os.path.isabs(location) or Path(location).is_absolute():
        raise ModelError(f"{refused} is refused: locations must be relative to the model's folder")
    candidate = base_dir / location
    walked = base_dir
    for part in Path(location).parts:
        walked = walked / part
        if walked.is_symlink():
            raise ModelError(f"{refused} is refused: it goes through a symbolic link ({walked})")
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelError(f"{refused} is refused: it points outside the model's folder")
    if not resolved.is_file():
        raise ModelError(f"{refused}: no such file {candidate}")


def _check(proto: onnx.ModelProto, label: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelError(
                f"{label} uses ONNX opset {opset.version}, newer than the {newest} this installation "
                "of onnx knows; upgrade the onnx package or export with an older opset"
            )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ModelError(f"{label} is not a valid ONNX model: {first_line}") from None
