"""Elementwise operators: math, activations, arithmetic, logic, bitwise, comparisons and casts.

Binary and variadic ops broadcast NumPy-style (opsets 1-6 of the binary ops broadcast only when
asked, aligning B with A from ``axis``). Values of the widened storage types (see dtypes.py) are
computed in their storage dtype, so e.g. a uint32 Sub may leave a value outside 0..2**32-1 that
the engine's boundary wraps; Cast, which knows its target type, wraps and rounds exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from kiln.ops.dtypes import element_type, to_numpy, to_torch, torch_dtype
from kiln.ops.registry import register

_T = onnx.TensorProto
_FLOAT8 = {
    torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
}


def _computable(x: torch.Tensor) -> torch.Tensor:
    """float8 values as float32 (exactly), since few torch kernels accept float8."""
    return x.to(torch.float32) if x.dtype in _FLOAT8 else x


# --- unary math ------------------------------------------------------------------------------

def _register_unary(op_type: str, since: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def unary(x, consumed_inputs=None):  # consumed_inputs: an opset-1 in-place hint, no meaning
        return fn(x)

    unary.__name__ = op_type.lower()
    register(op_type, since=since)(unary)


for _op_type, _since, _fn in (
    ("Abs", 1, torch.abs),
    ("Neg", 1, torch.neg),
    ("Reciprocal", 1, torch.reciprocal),
    ("Sqrt", 1, torch.sqrt),
    ("Exp", 1, torch.exp),
    ("Log", 1, torch.log),
    ("Ceil", 1, torch.ceil),
    ("Floor", 1, torch.floor),
    ("Round", 11, torch.round),  # half to even, as ONNX asks
    ("Sign", 9, torch.sign),
    ("Sin", 7, torch.sin),
    ("Cos", 7, torch.cos),
    ("Tan", 7, torch.tan),
    ("Asin", 7, torch.asin),
    ("Acos", 7, torch.acos),
    ("Atan", 7, torch.atan),
    ("Sinh", 9, torch.sinh),
    ("Cosh", 9, torch.cosh),
    ("Asinh", 9, torch.asinh),
    ("Acosh", 9, torch.acosh),
    ("Atanh", 9, torch.atanh),
    ("Erf", 9, torch.erf),
    ("Not", 1, torch.logical_not),
    ("Relu", 1, torch.relu),
    ("Sigmoid", 1, torch.sigmoid),
    ("Tanh", 1, torch.tanh),
    ("Softplus", 1, F.softplus),
    ("Softsign", 1, F.softsign),
    ("HardSwish", 14, F.hardswish),
    ("Mish", 18, F.mish),
    ("BitwiseNot", 18, torch.bitwise_not),
):
    _register_unary(_op_type, _since, _fn)


@register("IsNaN", since=9)
def is_nan(x):
    return torch.isnan(_computable(x))


@register("IsInf", since=10)
def is_inf(x, detect_negative=1, detect_positive=1):
    x = _computable(x)
    found = torch.zeros_like(x, dtype=torch.bool)
    if detect_positive:
        found |= torch.isposinf(x)
    if detect_negative:
        found |= torch.isneginf(x)
    return found


# --- activations with attributes -------------------------------------------------------------

@register("LeakyRelu", since=1)
def leaky_relu(x, alpha=0.01, consumed_inputs=None):
    return F.leaky_relu(x, alpha)


@register("PRelu", since=1)
def prelu(x, slope, consumed_inputs=None):
    return torch.where(x < 0, x * slope, x)


@register("Elu", since=1)
def elu(x, alpha=1.0, consumed_inputs=None):
    return F.elu(x, alpha)


@register("Selu", since=1)
def selu(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875,
         consumed_inputs=None):
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register("Celu", since=12)
def celu(x, alpha=1.0):
    return torch.celu(x, alpha)


@register("HardSigmoid", since=1)
def hard_sigmoid(x, alpha=0.2, beta=0.5, consumed_inputs=None):
    return (alpha * x + beta).clamp(0, 1)


@register("ThresholdedRelu", since=10)
def thresholded_relu(x, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@register("Shrink", since=9)
def shrink(x, bias=0.0, lambd=0.5):
    shrunk = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0))
    return shrunk.to(x.dtype)  # integer inputs come back from the float bias as their own type


@register("Gelu", since=20)
def gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


@register("Swish", since=24)
def swish(x, alpha=1.0):
    return x * torch.sigmoid(alpha * x)


@register("SwiGLU", since=28)
def swiglu(gate, value, alpha=1.0):
    return swish(gate, alpha) * value


# --- binary arithmetic, logic and comparisons ------------------------------------------------

def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates, as in C


def _power(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Pow's result has the base's type; an integer base meets a float exponent in float64."""
    if not base.is_floating_point() and exponent.is_floating_point():
        return torch.pow(base.to(torch.float64), exponent.to(torch.float64)).to(base.dtype)
    return torch.pow(base, exponent).to(base.dtype)


def _register_binary(op_type: str, since: int, fn: Callable, *, legacy_broadcast: bool) -> None:
    """Register ``fn(a, b)``, plus the opset 1-6 form with ``broadcast``/``axis`` attributes."""

    def binary(a, b):
        return fn(a, b)

    def binary_with_broadcast_attribute(a, b, broadcast=0, axis=None, consumed_inputs=None):
        if broadcast and axis is not None:
            # B's dims line up with A's starting at `axis`; pad B with trailing 1s for NumPy.
            trailing = a.dim() - (axis % a.dim()) - b.dim()
            b = b.reshape(*b.shape, *[1] * trailing)
        return fn(a, b)

    binary.__name__ = op_type.lower()
    register(op_type, since=since)(binary)
    if legacy_broadcast:
        register(op_type, since=1)(binary_with_broadcast_attribute)


for _op_type, _since, _fn, _legacy in (
    ("Add", 7, torch.add, True),
    ("Sub", 7, torch.sub, True),
    ("Mul", 7, torch.mul, True),
    ("Div", 7, _divide, True),
    ("Pow", 7, _power, True),
    ("And", 7, torch.logical_and, True),
    ("Or", 7, torch.logical_or, True),
    ("Xor", 7, torch.logical_xor, True),
    ("Equal", 7, torch.eq, True),
    ("Less", 7, torch.lt, True),
    ("Greater", 7, torch.gt, True),
    ("LessOrEqual", 12, torch.le, False),
    ("GreaterOrEqual", 12, torch.ge, False),
    ("BitwiseAnd", 18, torch.bitwise_and, False),
    ("BitwiseOr", 18, torch.bitwise_or, False),
    ("BitwiseXor", 18, torch.bitwise_xor, False),
):
    _register_binary(_op_type, _since, _fn, legacy_broadcast=_legacy)


@register("Equal", since=19)  # adds string inputs
def equal(a, b, *, _device):
    if isinstance(a, np.ndarray):  # string tensors stay NumPy
        return to_torch(np.asarray(a == b, dtype=bool), _device)
    return torch.eq(a, b)


@register("Mod", since=10)
def mod(a, b, fmod=0):
    if fmod:
        return torch.fmod(a, b)  # sign of the dividend, as C's fmod
    remainder = torch.remainder(a, b)  # sign of the divisor, as Python's %
    if remainder.is_floating_point():
        remainder = torch.where(remainder == 0, torch.copysign(remainder, b), remainder)
    return remainder


@register("BitShift", since=11)
def bit_shift(x, y, direction):
    # Shifts by a negative amount or by the bit width or more leave only the sign fill (spec from
    # opset 28); torch's shifts mask the amount on some devices, so handle them explicitly.
    width = x.element_size() * 8
    out_of_range = (y < 0) | (y >= width)
    amount = torch.where(out_of_range, torch.zeros_like(y), y)
    if direction == "LEFT":
        return torch.where(out_of_range, torch.zeros_like(x), x << amount)
    sign_fill = torch.where(x < 0, -1, 0).to(x.dtype)
    return torch.where(out_of_range, sign_fill, x >> amount)


@register("Where", since=9)
def where(condition, x, y):
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):  # string tensors stay NumPy
        return np.where(to_numpy(condition), x, y)
    return torch.where(condition, x, y)


@register("Clip", since=1)
def clip_with_attributes(x, min=-math.inf, max=math.inf, consumed_inputs=None):  # noqa: A002
    return torch.clamp(x, min, max)


@register("Clip", since=11)
def clip(x, low=None, high=None):
    if low is None and high is None:
        return x
    # Bounds are scalars; shaping them () keeps a 0-d x 0-d. min > max gives max everywhere.
    low = None if low is None else low.reshape(())
    high = None if high is None else high.reshape(())
    return torch.clamp(x, low, high)


# --- variadic --------------------------------------------------------------------------------

@register("Sum", since=1)
def sum_(*inputs, consumed_inputs=None):
    return functools.reduce(torch.add, inputs)


@register("Mean", since=1)
def mean(*inputs, consumed_inputs=None):
    return functools.reduce(torch.add, inputs) / len(inputs)


@register("Max", since=1)
def max_(*inputs, consumed_inputs=None):
    return functools.reduce(torch.maximum, inputs)


@register("Min", since=1)
def min_(*inputs, consumed_inputs=None):
    return functools.reduce(torch.minimum, inputs)


# --- Cast ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _MiniFloat:
    """A float format narrower than torch's arithmetic types, by what rounding to it needs."""

    mantissa_bits: int
    min_exponent: int  # exponent of the smallest normal number
    max_value: float
    overflow: float | None  # what a value beyond max_value becomes unsaturated (None: saturates)

    @property
    def max_exponent(self) -> int:
        return math.frexp(self.max_value)[1] - 1


_MINIFLOATS = {
    _T.FLOAT8E4M3FN: _MiniFloat(3, -6, 448.0, math.nan),
    _T.FLOAT8E4M3FNUZ: _MiniFloat(3, -7, 240.0, math.nan),
    _T.FLOAT8E5M2: _MiniFloat(2, -14, 57344.0, math.inf),
    _T.FLOAT8E5M2FNUZ: _MiniFloat(2, -15, 57344.0, math.nan),
    _T.FLOAT4E2M1: _MiniFloat(1, 0, 6.0, None),
}
for _name, _format in (("FLOAT6E2M3", _MiniFloat(3, 0, 7.5, None)),
                       ("FLOAT6E3M2", _MiniFloat(2, -2, 28.0, None))):
    if hasattr(_T, _name):  # newer onnx releases only
        _MINIFLOATS[getattr(_T, _name)] = _format

# Integer types held in a wider storage dtype: (bits, signed). Casts wrap into their range.
_NARROW_INTEGERS = {
    _T.UINT16: (16, False), _T.UINT32: (32, False),
    _T.INT4: (4, True), _T.UINT4: (4, False),
}
for _name, _bits_signed in (("INT2", (2, True)), ("UINT2", (2, False))):
    if hasattr(_T, _name):
        _NARROW_INTEGERS[getattr(_T, _name)] = _bits_signed


def _round_to_minifloat(x: torch.Tensor, fmt: _MiniFloat) -> torch.Tensor:
    """Round to the nearest value of ``fmt`` (ties to even), not yet limited to its range."""
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    # The spacing of fmt's numbers around x: subnormals share the smallest normal's spacing, and
    # values past the largest binade keep its spacing, so they round to a value past max_value.
    leading = (exponent - 1).clamp(fmt.min_exponent, fmt.max_exponent)
    spacing = torch.ldexp(torch.ones_like(x), leading - fmt.mantissa_bits)
    return torch.round(x / spacing) * spacing


def _to_minifloat(x: torch.Tensor, fmt: _MiniFloat, saturate: bool) -> torch.Tensor:
    # Round in float32 (float64 for doubles, avoiding double rounding); NaN stays NaN.
    values = x if x.dtype == torch.float64 else x.to(torch.float32)
    rounded = _round_to_minifloat(values, fmt)
    beyond = fmt.max_value if saturate or fmt.overflow is None else fmt.overflow
    limit = torch.copysign(torch.full_like(values, beyond), values)
    return torch.where(rounded.abs() > fmt.max_value, limit, rounded)


def _to_float8e8m0(x: torch.Tensor, saturate: bool, round_mode: str) -> torch.Tensor:
    """E8M0 keeps only an exponent: take float32's and round by the discarded mantissa bits."""
    bits = x.to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    if round_mode == "up":
        round_up = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":  # ties go up, except from the subnormal range
        round_up = ((bits & 0x400000) != 0) & (((bits & 0x3FFFFF) != 0) | (exponent > 0))
    elif round_mode == "down":
        round_up = torch.zeros_like(exponent, dtype=torch.bool)
    else:
        raise ValueError(f"Cast: unknown round_mode {round_mode!r}")
    if saturate:
        round_up &= exponent != 0xFE
    # The all-ones exponent (Inf, NaN, or an unsaturated overflow) is E8M0's NaN.
    exponent = torch.where(exponent == 0xFF, 0xFF, exponent + round_up.to(exponent.dtype))
    if saturate:
        exponent = torch.where(torch.isinf(x), 0xFE, exponent)  # Inf saturates to E8M0_MAX
    return exponent.to(torch.uint8).view(torch.float8_e8m0fnu)


def _wrap_integer(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Keep the low ``bits`` bits (two's complement when signed), as C's integer narrowing does."""
    wrapped = x.to(torch.int64) & ((1 << bits) - 1)
    if signed:
        wrapped = torch.where(wrapped >= 1 << (bits - 1), wrapped - (1 << bits), wrapped)
    return wrapped


def _parse_strings(x: np.ndarray, device) -> torch.Tensor:
    # float() reads "1e-5", "INF", "+inf", "NaN" and the like; integers go through float64 too.
    return to_torch(np.asarray(x, dtype=object).astype(np.float64), device)


def _cast(x, to: int, saturate: bool, round_mode: str, device):
    if to == _T.STRING:
        return to_numpy(x).astype(np.str_).astype(object)
    if isinstance(x, np.ndarray):
        x = _parse_strings(x, device)
    x = _computable(x)
    target = torch_dtype(to)
    if to in _MINIFLOATS:
        return _to_minifloat(x, _MINIFLOATS[to], saturate).to(target)
    if to == _T.FLOAT8E8M0:
        return _to_float8e8m0(x, saturate, round_mode)
    if to in _NARROW_INTEGERS:
        return _wrap_integer(x, *_NARROW_INTEGERS[to]).to(target)
    return x.to(target)


def _onnx_type(to: int | str) -> int:
    return _T.DataType.Value(to.upper()) if isinstance(to, str) else to  # Cast-1 names the type


@register("Cast", since=1)
def cast(x, *, to, saturate=1, round_mode="up", _device):
    return _cast(x, _onnx_type(to), bool(saturate), round_mode, _device)


@register("CastLike", since=15)
def cast_like(x, like, *, saturate=1, round_mode="up", _device, _input_types=(0, 0)):
    # The declared type of `like` tells widened types (uint4 stored as uint8) apart; without one,
    # its storage dtype is the best guess.
    to = _input_types[1] or (
        _T.STRING if isinstance(like, np.ndarray) else element_type(like.dtype).onnx_type
    )
    return _cast(x, to, bool(saturate), round_mode, _device)


# --- BitCast ---------------------------------------------------------------------------------

_SUB_BYTE_BITS = {_T.INT4: 4, _T.UINT4: 4, _T.FLOAT4E2M1: 4}
for _name, _bits in (("INT2", 2), ("UINT2", 2)):
    if hasattr(_T, _name):
        _SUB_BYTE_BITS[getattr(_T, _name)] = _bits
_INT_OF_WIDTH = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}
_FLOAT4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by the 3 bits below the sign


def _bit_width(onnx_type: int) -> int:
    return _SUB_BYTE_BITS.get(onnx_type) or element_type(onnx_type).numpy.itemsize * 8


def _raw_bits(x: torch.Tensor, width: int) -> torch.Tensor:
    """The input's ``width``-bit encoding, in an integer tensor (sub-byte widths in int64)."""
    if x.dtype == torch.float32 and width == 4:  # float4e2m1 is stored as float32
        magnitudes = torch.tensor(_FLOAT4_MAGNITUDES, device=x.device)
        code = torch.searchsorted(magnitudes, x.abs())
        return code | (torch.signbit(x).to(torch.int64) << 3)
    if width < 8:
        return x.to(torch.int64) & ((1 << width) - 1)
    if x.element_size() * 8 == width:
        return x.view(_INT_OF_WIDTH[width])
    return x.to(_INT_OF_WIDTH[width])  # uint16/uint32 held wider: keep the low bits


def _from_raw_bits(bits: torch.Tensor, to: int) -> torch.Tensor:
    target = torch_dtype(to)
    if to == _T.FLOAT4E2M1:
        magnitudes = torch.tensor(_FLOAT4_MAGNITUDES, device=bits.device)
        return torch.where((bits & 8) != 0, -1.0, 1.0) * magnitudes[bits & 7]
    if to in _NARROW_INTEGERS:
        return _wrap_integer(bits, *_NARROW_INTEGERS[to]).to(target)
    return bits.view(target)


@register("BitCast", since=26)
def bit_cast(x, *, to):
    return _from_raw_bits(_raw_bits(x, _bit_width(to)), to)
