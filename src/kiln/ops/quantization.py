"""Linear quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear and the integer /
quantized-linear MatMul and Conv ops.

Quantized values live in kiln's storage dtypes (see ``dtypes.py``): a uint16 zero point arrives as
int32, int4/int2 as int8, uint4/uint2 as uint8 and float4e2m1 as float32. QuantizeLinear's output
type is the ``output_dtype`` attribute when set, else the type the model declares for the output,
else the one the zero point's storage dtype stands for (which cannot tell the 2- and 4-bit integer
types from their 8-bit storage type, nor the 4/6-bit float types apart).

Integer accumulations run in a float type chosen to hold them exactly, because torch has no integer
matmul/convolution on every device.
"""

from __future__ import annotations

import math

import torch
from onnx import TensorProto

from kiln.ops.dtypes import torch_dtype
from kiln.ops.conv import conv as onnx_conv
from kiln.ops.registry import register

_T = TensorProto

# Saturation range of each integer quantized type.
_INTEGER_RANGES = {
    _T.UINT8: (0, 255),
    _T.INT8: (-128, 127),
    _T.UINT16: (0, 65535),
    _T.INT16: (-32768, 32767),
    _T.UINT4: (0, 15),
    _T.INT4: (-8, 7),
    _T.UINT2: (0, 3),
    _T.INT2: (-2, 1),
}
_FLOAT8_TYPES = {_T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ, _T.FLOAT8E5M2, _T.FLOAT8E5M2FNUZ}
# Small float types stored as float32: (exponent bias, mantissa bits, largest finite value).
_SMALL_FLOATS = {
    _T.FLOAT4E2M1: (1, 1, 6.0),
    _T.FLOAT6E2M3: (1, 3, 7.5),
    _T.FLOAT6E3M2: (3, 2, 28.0),
}

# The quantized type a zero point's storage dtype stands for when no output_dtype says otherwise.
_TYPE_OF_ZERO_POINT_STORAGE = {
    torch.uint8: _T.UINT8,
    torch.int8: _T.INT8,
    torch.int16: _T.INT16,
    torch.int32: _T.UINT16,  # int32 is not a quantized type: it is uint16's storage
    torch.float32: _T.FLOAT4E2M1,
    torch.float8_e4m3fn: _T.FLOAT8E4M3FN,
    torch.float8_e4m3fnuz: _T.FLOAT8E4M3FNUZ,
    torch.float8_e5m2: _T.FLOAT8E5M2,
    torch.float8_e5m2fnuz: _T.FLOAT8E5M2FNUZ,
}


def _broadcastable(
    param: torch.Tensor, shape: torch.Size, axis: int, block_size: int
) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against an input of ``shape``.

    Scalars (and one-element tensors) apply to the whole tensor, a 1-D tensor to ``axis`` and,
    with ``block_size``, each entry covers ``block_size`` consecutive elements along ``axis``.
    """
    if param.numel() == 1:
        return param.reshape(())
    axis = axis % len(shape)
    if block_size:
        repeated = param.repeat_interleave(block_size, dim=axis)
        return repeated.narrow(axis, 0, shape[axis])
    view = [1] * len(shape)
    view[axis] = param.numel()
    return param.reshape(view)


def _as_compute_float(dtype: torch.dtype) -> torch.dtype:
    """float8 scales and integer inputs are computed on in float32."""
    computable = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return dtype if dtype in computable else torch.float32


def _round_to_small_float(x: torch.Tensor, onnx_type: int) -> torch.Tensor:
    """Round to the nearest value of a float4/float6 type (ties to even), saturating at its max."""
    bias, mantissa_bits, largest = _SMALL_FLOATS[onnx_type]
    magnitude = x.abs().clamp(max=largest)
    # Spacing of representable values around |x|: fixed below the smallest normal exponent.
    exponent = torch.floor(torch.log2(magnitude)).clamp(min=1 - bias)
    spacing = torch.exp2(exponent - mantissa_bits)
    rounded = (torch.round(magnitude / spacing) * spacing).clamp(max=largest)
    return torch.copysign(rounded, x)


def _to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: int) -> torch.Tensor:
    """Round to a float8 type; out-of-range values saturate or overflow as ONNX's tables say."""
    if saturate:  # out-of-range values (infinities too) become the largest finite value
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    if dtype == torch.float8_e4m3fn:
        # torch saturates this type, but ONNX overflows to NaN: beyond 464 (halfway from the max
        # 448 to the next power-of-two step) rounding leaves the representable range.
        x = torch.where(x.abs() > 464, torch.full_like(x, math.nan), x)
    return x.to(dtype)


def _quantized_type(y_zero_point: torch.Tensor | None, output_dtype: int, declared: int) -> int:
    if output_dtype:
        return output_dtype
    if declared:
        return declared
    if y_zero_point is None:
        return _T.UINT8
    return _TYPE_OF_ZERO_POINT_STORAGE[y_zero_point.dtype]


@register("QuantizeLinear", since=10)
def quantize_linear(
    x, y_scale, y_zero_point=None, *,
    axis=1, block_size=0, output_dtype=0, precision=0, saturate=1, _output_types=(0,),
):
    quantized_type = _quantized_type(y_zero_point, output_dtype, _output_types[0])
    compute = torch_dtype(precision) if precision else torch.promote_types(
        _as_compute_float(x.dtype), _as_compute_float(y_scale.dtype)
    )
    scaled = x.to(compute) / _broadcastable(y_scale, x.shape, axis, block_size).to(compute)
    zero_point = None
    if y_zero_point is not None:
        zero_point = _broadcastable(y_zero_point, x.shape, axis, block_size)
    if quantized_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[quantized_type]
        # Round half to even, then shift and saturate in int64, where nothing overflows (rounded
        # values beyond float32's exact integers saturate whatever the zero point).
        q = torch.round(scaled).float().clamp(-(2**40), 2**40).to(torch.int64)
        if zero_point is not None:
            q = q + zero_point.to(torch.int64)
        return q.clamp(low, high).to(torch_dtype(quantized_type))
    if quantized_type in _FLOAT8_TYPES:  # the zero point of float8 types is always 0
        return _to_float8(scaled, torch_dtype(quantized_type), saturate)
    if zero_point is not None:
        scaled = scaled + zero_point.to(scaled.dtype)
    return _round_to_small_float(scaled.float(), quantized_type)


@register("DequantizeLinear", since=10)
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    out_dtype = torch_dtype(output_dtype) if output_dtype else x_scale.dtype
    values = x.float()
    if x_zero_point is not None:
        values = values - _broadcastable(x_zero_point, x.shape, axis, block_size).float()
    scale = _broadcastable(x_scale, x.shape, axis, block_size).float()
    return (values * scale).to(out_dtype)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(x):
    # The range always includes 0 so that 0 is exactly representable.
    low = x.min().clamp(max=0).float()
    high = x.max().clamp(min=0).float()
    scale = torch.where(high == low, torch.ones_like(high), high - low) / 255
    zero_point = torch.round((0 - low / scale).clamp(0, 255))
    y = (torch.round(x.float() / scale) + zero_point).clamp(0, 255)
    return y.to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)


def _shifted(
    values: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype,
    zero_point_shape: list[int] | None = None,
) -> torch.Tensor:
    """``values - zero_point`` in ``dtype``; a per-channel zero point takes ``zero_point_shape``."""
    values = values.to(dtype)
    if zero_point is None:
        return values
    if zero_point.numel() > 1 and zero_point_shape is not None:
        zero_point = zero_point.reshape(zero_point_shape)
    return values - zero_point.to(dtype)


def _integer_matmul(a, b, a_zero_point, b_zero_point) -> torch.Tensor:
    """The exact int64 product of the zero-point-shifted matrices.

    A 1-D ``a_zero_point`` holds one value per row of ``a``; a 1-D ``b_zero_point`` one per column.
    """
    # Every partial sum of products of 8-bit differences (<= 255) is an integer that float32 holds
    # exactly while the depth keeps it under 2**24, whatever order the matmul sums in.
    dtype = torch.float32 if a.shape[-1] * 255 * 255 < 2**24 else torch.float64
    a_shifted = _shifted(a, a_zero_point, dtype, [-1, 1])
    b_shifted = _shifted(b, b_zero_point, dtype)
    return torch.matmul(a_shifted, b_shifted).to(torch.int64)


def _integer_conv(x, w, x_zero_point, w_zero_point, conv_attributes) -> torch.Tensor:
    """The exact int64 convolution of the zero-point-shifted input and weights.

    Runs the registered Conv op, so padding and auto_pad follow it exactly. It runs in float64 and
    rounds: convolution algorithms (Winograd, FFT) may be inexact even on integer values.
    """
    x_shifted = _shifted(x, x_zero_point, torch.float64)
    # A 1-D weight zero point holds one value per output channel.
    w_shifted = _shifted(w, w_zero_point, torch.float64, [-1] + [1] * (w.dim() - 1))
    attributes = {k: v for k, v in conv_attributes.items() if v is not None}
    return torch.round(onnx_conv(x_shifted, w_shifted, **attributes)).to(torch.int64)


def _requantize(accumulator, multiplier, y_zero_point, out_dtype) -> torch.Tensor:
    """``saturate(round(accumulator * multiplier) + y_zero_point)`` in 8-bit ``out_dtype``."""
    # float64 holds every int32 accumulator exactly.
    y = accumulator.to(torch.float64) * multiplier.to(torch.float64)
    y = torch.round(y)
    if y_zero_point is not None:
        y = y + y_zero_point.to(torch.float64)
    info = torch.iinfo(out_dtype)
    return y.clamp(info.min, info.max).to(out_dtype)


@register("MatMulInteger", since=10)
def matmul_integer(A, B, a_zero_point=None, b_zero_point=None):
    return _integer_matmul(A, B, a_zero_point, b_zero_point).to(torch.int32)


@register("QLinearMatMul", since=10)
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    accumulator = _integer_matmul(a, b, a_zero_point, b_zero_point)
    # Per-row scales of a broadcast down the rows; b's and y's per-column ones along the last axis.
    a_scale = a_scale.reshape(-1, 1) if a_scale.numel() > 1 else a_scale
    # The multiplier is computed in the scales' own precision, as the reference does.
    multiplier = a_scale * b_scale / y_scale
    out_dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    return _requantize(accumulator, multiplier, y_zero_point, out_dtype)


@register("ConvInteger", since=10)
def conv_integer(
    x, w, x_zero_point=None, w_zero_point=None, *,
    auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None,
):
    attributes = dict(auto_pad=auto_pad, dilations=dilations, group=group,
                      kernel_shape=kernel_shape, pads=pads, strides=strides)
    return _integer_conv(x, w, x_zero_point, w_zero_point, attributes).to(torch.int32)


@register("QLinearConv", since=10)
def qlinear_conv(
    x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point=None, B=None, *,
    auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None,
):
    attributes = dict(auto_pad=auto_pad, dilations=dilations, group=group,
                      kernel_shape=kernel_shape, pads=pads, strides=strides)
    accumulator = _integer_conv(x, w, x_zero_point, w_zero_point, attributes)
    channel_view = [1, -1] + [1] * (x.dim() - 2)
    if B is not None:  # int32 bias, quantized with scale x_scale * w_scale and zero point 0
        accumulator = accumulator + B.to(torch.int64).reshape(channel_view)
    if w_scale.numel() > 1:  # one scale per output channel
        w_scale = w_scale.reshape(channel_view)
    multiplier = x_scale * w_scale / y_scale
    out_dtype = y_zero_point.dtype if y_zero_point is not None else x.dtype
    return _requantize(accumulator, multiplier, y_zero_point, out_dtype)
