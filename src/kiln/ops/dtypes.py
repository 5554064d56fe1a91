"""Element types: ONNX's type enum, the NumPy dtype users see, and the torch dtype kiln computes in.

torch lacks some ONNX types or supports them with few kernels. Those are stored widened, and every
value of such a type holds only values the narrow type can represent:

    uint16 -> int32, uint32/uint64 -> int64, int4/int2 -> int8, uint4/uint2 -> uint8,
    float4e2m1/float6 -> float32.

Conversion at the engine's boundary (``to_torch`` / ``to_numpy``) narrows them back. Strings stay
NumPy object arrays: no torch type holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import torch


@dataclass(frozen=True)
class ElementType:
    onnx_type: int
    name: str
    numpy: np.dtype
    torch: torch.dtype | None  # storage dtype; None for strings

    @property
    def widened(self) -> bool:
        return self.torch is not None and _TORCH_TO_NUMPY.get(self.torch) != self.numpy


_T = onnx.TensorProto
_STORAGE: dict[int, torch.dtype | None] = {
    _T.FLOAT: torch.float32,
    _T.UINT8: torch.uint8,
    _T.INT8: torch.int8,
    _T.UINT16: torch.int32,
    _T.INT16: torch.int16,
    _T.INT32: torch.int32,
    _T.INT64: torch.int64,
    _T.STRING: None,
    _T.BOOL: torch.bool,
    _T.FLOAT16: torch.float16,
    _T.DOUBLE: torch.float64,
    _T.UINT32: torch.int64,
    _T.UINT64: torch.int64,
    _T.COMPLEX64: torch.complex64,
    _T.COMPLEX128: torch.complex128,
    _T.BFLOAT16: torch.bfloat16,
    _T.FLOAT8E4M3FN: torch.float8_e4m3fn,
    _T.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    _T.FLOAT8E5M2: torch.float8_e5m2,
    _T.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    _T.UINT4: torch.uint8,
    _T.INT4: torch.int8,
    _T.FLOAT4E2M1: torch.float32,
    _T.FLOAT8E8M0: torch.float8_e8m0fnu,
}
for _name, _storage in (("UINT2", torch.uint8), ("INT2", torch.int8),
                        ("FLOAT6E2M3", torch.float32), ("FLOAT6E3M2", torch.float32)):
    if hasattr(_T, _name):  # newer onnx releases only
        _STORAGE[getattr(_T, _name)] = _storage

_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
    torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
    torch.float8_e4m3fnuz: np.dtype(ml_dtypes.float8_e4m3fnuz),
    torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
    torch.float8_e5m2fnuz: np.dtype(ml_dtypes.float8_e5m2fnuz),
    torch.float8_e8m0fnu: np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Raw bit views used to move types NumPy cannot hand to torch directly.
_BIT_VIEW = {1: (np.uint8, torch.uint8), 2: (np.int16, torch.int16)}

ELEMENT_TYPES: dict[int, ElementType] = {}
for _onnx_type, _storage in _STORAGE.items():
    _np = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(_onnx_type))
    ELEMENT_TYPES[_onnx_type] = ElementType(_onnx_type, _np.name, _np, _storage)
_BY_NAME = {t.name: t for t in ELEMENT_TYPES.values()}
_BY_NUMPY = {t.numpy: t for t in ELEMENT_TYPES.values()}
_BY_TORCH = {dt: _BY_NUMPY[npdt] for dt, npdt in _TORCH_TO_NUMPY.items()}


def element_type(key: int | str | np.dtype | torch.dtype) -> ElementType:
    """Look up an element type by ONNX enum, name (``"float32"``), NumPy dtype or torch dtype."""
    if isinstance(key, torch.dtype):
        return _BY_TORCH[key]
    if isinstance(key, int):
        return ELEMENT_TYPES[key]
    if isinstance(key, str) and key in _BY_NAME:
        return _BY_NAME[key]
    return _BY_NUMPY[np.dtype(key)]


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype values of ``onnx_type`` are stored in (see the module docstring)."""
    storage = ELEMENT_TYPES[onnx_type].torch
    if storage is None:
        raise TypeError("string tensors have no torch dtype")
    return storage


def to_torch(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor | np.ndarray:
    """A NumPy array as a torch tensor in kiln's storage dtype (strings stay NumPy)."""
    array = np.asarray(array)
    etype = element_type(array.dtype)
    if etype.torch is None:
        return array
    if etype.widened:
        array = array.astype(_TORCH_TO_NUMPY[etype.torch])
    if not (array.flags.c_contiguous and array.flags.writeable):  # torch wants both
        array = array.copy(order="C")
    if array.dtype in _BY_TORCH_NUMPY_NATIVE:
        tensor = torch.from_numpy(array)
    else:
        bits_np, _ = _BIT_VIEW[array.dtype.itemsize]
        tensor = torch.from_numpy(array.view(bits_np)).view(etype.torch)
    return tensor.to(device)


def to_numpy(value: torch.Tensor | np.ndarray, onnx_type: int | None = None) -> np.ndarray:
    """A torch tensor as a NumPy array of ``onnx_type`` (default: the tensor's own type)."""
    if isinstance(value, np.ndarray):
        return value
    tensor = value.detach().cpu().contiguous()
    if tensor.dtype in _NATIVE_TORCH:
        array = tensor.numpy()
    else:
        _, bits_torch = _BIT_VIEW[tensor.element_size()]
        array = tensor.view(bits_torch).numpy().view(_TORCH_TO_NUMPY[tensor.dtype])
    if onnx_type is not None:
        target = ELEMENT_TYPES[onnx_type].numpy
        if array.dtype != target:
            array = array.astype(target)
    return array


_NATIVE_TORCH = {
    torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
}
_BY_TORCH_NUMPY_NATIVE = {_TORCH_TO_NUMPY[t] for t in _NATIVE_TORCH}
