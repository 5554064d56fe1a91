"""What HTTP and gRPC share: KServe v2 datatypes, the decoded inference request, tensor decoding
and encoding, and the kinds of request error with their HTTP status and gRPC code.

The frontends turn wire formats into an :class:`InferenceRequest` of NumPy arrays; everything
behind them (validation against the model, batching, running) never sees a wire format.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from kiln.errors import KilnError

# KServe v2 datatype -> NumPy dtype. BYTES holds variable-length byte strings (NumPy objects).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF_NUMPY = {dtype: name for name, dtype in DATATYPES.items()}
# Dimensions must fit int64, as in the protocol's gRPC messages.
MAX_DIM = 2**63 - 1


class RequestError(KilnError):
    """A request the server cannot serve; ``http_status`` and ``grpc_code`` say how to answer."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class InvalidRequest(RequestError):
    """The client sent something malformed or not matching the model."""


class NotFound(RequestError):
    """No such model, version or route."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class Unavailable(RequestError):
    """The server cannot take the request now: queue full, timed out, shutting down, not ready."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class InternalError(RequestError):
    """Something failed inside the server; the details are logged, never sent."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self) -> None:
        super().__init__("internal error; see the server log")


def datatype_of(numpy_dtype: np.dtype | str | None) -> str:
    """The KServe datatype of an engine's NumPy dtype name (``"float32"`` -> ``"FP32"``)."""
    dtype = np.dtype(numpy_dtype or "float32")
    if dtype not in _DATATYPE_OF_NUMPY:
        raise InvalidRequest(f"dtype {dtype} has no KServe v2 datatype")
    return _DATATYPE_OF_NUMPY[dtype]


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where a tensor lies in a registered shared memory region."""

    region: str
    byte_size: int
    offset: int = 0

    def parameters(self) -> dict[str, str | int]:
        """The tensor parameters that name this place, as a response carries them."""
        named = {"shared_memory_region": self.region, "shared_memory_byte_size": self.byte_size}
        return {**named, "shared_memory_offset": self.offset} if self.offset else named


def shared_memory_ref(tensor: str, parameters: dict[str, Any]) -> SharedMemoryRef | None:
    """The shared memory a tensor's parameters point at, or None when they point at none."""
    if "shared_memory_region" not in parameters:
        for key in ("shared_memory_byte_size", "shared_memory_offset"):
            if key in parameters:
                raise InvalidRequest(f"tensor {tensor!r}: {key!r} needs 'shared_memory_region'")
        return None
    region = parameters["shared_memory_region"]
    if not isinstance(region, str) or not region:
        raise InvalidRequest(f"tensor {tensor!r}: 'shared_memory_region' must be a region name")
    values = {}
    for key, required in (("shared_memory_byte_size", True), ("shared_memory_offset", False)):
        value = parameters.get(key, None if required else 0)
        if value is None:
            raise InvalidRequest(f"tensor {tensor!r}: 'shared_memory_region' needs {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"tensor {tensor!r}: {key!r} must be a non-negative integer")
        values[key] = value
    return SharedMemoryRef(region, values["shared_memory_byte_size"], values["shared_memory_offset"])


@dataclass
class InferenceRequest:
    """A decoded request: input arrays by name, and which outputs to send back and how."""

    model: str
    version: str  # "" for the model's newest ready version
    inputs: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=list)  # empty: every output
    # HTTP only: which outputs go as raw bytes after the JSON (by name, else the default)
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    binary_output_default: bool = False
    id: str = ""
    timeout_us: int | None = None
    shared_memory_outputs: dict[str, SharedMemoryRef] = field(default_factory=dict)


@dataclass
class InferenceResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    # outputs written into shared memory (their arrays still say datatype and shape)
    shared_memory: dict[str, SharedMemoryRef] = field(default_factory=dict)


def parse_shape(tensor: str, shape: Any) -> tuple[int, ...]:
    """A shape from the wire: a list of non-negative integers that fit int64."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidRequest(f"tensor {tensor!r}: 'shape' must be a list of integers")
    for dim in shape:
        # bool is an int in Python but never a dimension
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise InvalidRequest(f"tensor {tensor!r}: dimension {dim!r} is not an integer")
        if dim < 0:
            raise InvalidRequest(f"tensor {tensor!r}: dimension {dim} is negative")
        if dim > MAX_DIM:
            raise InvalidRequest(f"tensor {tensor!r}: dimension {dim} overflows int64")
    return tuple(shape)


def numpy_dtype(tensor: str, datatype: Any) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidRequest(
            f"tensor {tensor!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    return DATATYPES[datatype]


def from_bytes(
    tensor: str, datatype: str, shape: tuple[int, ...], data: bytes | memoryview, copy: bool = True
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (BYTES: each element length-prefixed).

    ``copy=False`` returns a view of ``data`` (shared memory: the client keeps it unchanged until
    the response); a copy otherwise, so that a request's message is not held while it queues."""
    dtype = numpy_dtype(tensor, datatype)
    count = math.prod(shape)
    if datatype == "BYTES":
        if count * 4 > len(data):  # each element takes at least its 4-byte length
            raise InvalidRequest(f"tensor {tensor!r}: {len(data)} bytes cannot hold {count} BYTES elements")
        return _decode_bytes_elements(tensor, data, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"tensor {tensor!r}: {len(data)} bytes of data, but {datatype} of shape {list(shape)} "
            f"takes {expected}"
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    return (array.astype(dtype) if copy or array.dtype != dtype else array).reshape(shape)


def from_list(tensor: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """A tensor from JSON values (flat or nested lists), checked for kind and range."""
    dtype = numpy_dtype(tensor, datatype)
    if not isinstance(data, list):
        raise InvalidRequest(f"tensor {tensor!r}: 'data' must be a list")
    try:
        values = np.array(data, dtype=object if datatype == "BYTES" else None)
    except ValueError:
        raise InvalidRequest(f"tensor {tensor!r}: 'data' is a ragged nested list") from None
    count = math.prod(shape)
    if values.size != count:
        raise InvalidRequest(
            f"tensor {tensor!r}: {values.size} values in 'data', but shape {list(shape)} holds {count}"
        )
    if datatype == "BYTES":
        return _bytes_from_json(tensor, values).reshape(shape)
    _check_kind(tensor, datatype, dtype, values)
    return values.astype(dtype).reshape(shape)


def _check_kind(tensor: str, datatype: str, dtype: np.dtype, values: np.ndarray) -> None:
    kind = values.dtype.kind
    if values.size == 0:
        return
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu" or kind == "O" and all(isinstance(v, int) for v in values.flat)
        if ok:
            info = np.iinfo(dtype)
            low, high = int(values.min()), int(values.max())  # Python ints: no overflow here
            if low < info.min or high > info.max:
                raise InvalidRequest(
                    f"tensor {tensor!r}: value {low if low < info.min else high} is out of range "
                    f"for {datatype}"
                )
    else:
        ok = kind in "iuf"
    if not ok:
        raise InvalidRequest(f"tensor {tensor!r}: 'data' holds values that are not {datatype}")


def _bytes_from_json(tensor: str, values: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape, dtype=object)
    for index, value in np.ndenumerate(values):
        if not isinstance(value, str):
            raise InvalidRequest(f"tensor {tensor!r}: BYTES 'data' must hold strings")
        out[index] = value.encode()
    return out


def _decode_bytes_elements(tensor: str, data: bytes | memoryview, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    view, offset = memoryview(data), 0
    for index in range(count):
        if offset + 4 > len(view):
            raise InvalidRequest(f"tensor {tensor!r}: BYTES data ends inside element {index}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidRequest(f"tensor {tensor!r}: BYTES element {index} overruns the data")
        out[index] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise InvalidRequest(f"tensor {tensor!r}: {len(view) - offset} bytes left after {count} elements")
    return out


def to_bytes(array: np.ndarray) -> bytes:
    """The raw little-endian bytes of an output (BYTES: each element length-prefixed)."""
    if array.dtype == object:
        parts = []
        for value in array.flat:
            value = value if isinstance(value, bytes) else str(value).encode()
            parts += [struct.pack("<I", len(value)), value]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_list(array: np.ndarray) -> list:
    """An output as a flat JSON-ready list, in row-major order."""
    if array.dtype == object:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.flat]
    if array.dtype == DATATYPES["BF16"]:
        array = array.astype(np.float32)
    return array.reshape(-1).tolist()
