"""The quantized layers' epilogue inside Triton kernels: dequantize, bias, residual, activation.

:func:`dequantize_epilogue` turns a tile of integer (or fp8 float) accumulators into the layer's
output values in float32, as :mod:`kiln.ops.quantized` defines them: ``acc * x_scale * w_scale``
(the zero point's share, ``zero_point * colsum(w_q)``, taken away first in int32, which is exact),
``+ bias``, then ``act(y + residual)`` or ``act(y) + residual``
(:func:`~kiln.ops.activation.apply_epilogue`). Activations are those of
:data:`~kiln.ops.activation.ACTIVATIONS`, selected by a compile-time code; their parameters
(LeakyRelu/Elu alpha, Clip bounds, HardSigmoid alpha and beta) are run-time values that
:func:`activation_arguments` fills with the same defaults.

GELU into a 16-bit or an 8-bit output takes the tanh form on the hardware's ``tanh.approx.f32``, as
cuBLASLt's GELU epilogue does for the fp16 layers (:mod:`kiln.kernels.cublas_gemm`): the two forms
differ by less than 5e-4, and the approximate tanh by 2**-11 of itself, of the order of the
outputs' own rounding (a float16 step near 1; an int8 step at output scales above 5e-4), while erf costs the epilogue of an int8 BERT-base FFN GEMM
(M=8192, K=768, N=3072) on an H100 a third of its time (0.092 ms against 0.065; in fp8, writing fp8
for a second FFN product with a static scale, 0.132 against 0.083). Triton's interpreter runs no
PTX: there the tanh is computed from ``exp``.

A layer that hands its output to the next quantized layer (``y_type``) stores the epilogue's
float32 values quantized with that layer's scale (:func:`output_values`), as
:func:`~kiln.ops.quantized.quantize_activation` computes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_quantize import INT8_HIGH, INT8_LOW, quantize_values
from kiln.ops.activation import ACTIVATIONS

ACTIVATION_CODES = {"": 0, **{name: code for code, name in enumerate(ACTIVATIONS, start=1)}}
FAST_GELU = tl.constexpr(len(ACTIVATION_CODES))  # either GELU, into a 16-bit or 8-bit output
HALF_OUTPUTS = (torch.float16, torch.bfloat16)
QUANTIZED_OUTPUTS = (torch.int8, torch.float8_e4m3fn)
ROUGH_OUTPUTS = HALF_OUTPUTS + QUANTIZED_OUTPUTS  # rounded about as coarsely as the tanh form differs
COMPILED = os.environ.get("TRITON_INTERPRET") != "1"  # not in Triton's interpreter
HARDWARE_TANH = tl.constexpr(COMPILED)
# Parameters' defaults, as ACTIVATIONS applies them (Clip has no defaults: it needs both).
_DEFAULTS = {"LeakyRelu": (0.01, 0.0), "Elu": (1.0, 0.0), "HardSigmoid": (0.2, 0.5)}
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch's softplus is the identity beyond it
INV_SQRT2 = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
RELU = tl.constexpr(ACTIVATION_CODES["Relu"])
LEAKY_RELU = tl.constexpr(ACTIVATION_CODES["LeakyRelu"])
ELU = tl.constexpr(ACTIVATION_CODES["Elu"])
CLIP = tl.constexpr(ACTIVATION_CODES["Clip"])
SIGMOID = tl.constexpr(ACTIVATION_CODES["Sigmoid"])
HARD_SIGMOID = tl.constexpr(ACTIVATION_CODES["HardSigmoid"])
TANH = tl.constexpr(ACTIVATION_CODES["Tanh"])
SILU = tl.constexpr(ACTIVATION_CODES["Silu"])
HARD_SWISH = tl.constexpr(ACTIVATION_CODES["HardSwish"])
GELU = tl.constexpr(ACTIVATION_CODES["Gelu"])
GELU_TANH = tl.constexpr(ACTIVATION_CODES["GeluTanh"])
MISH = tl.constexpr(ACTIVATION_CODES["Mish"])
SOFTPLUS = tl.constexpr(ACTIVATION_CODES["Softplus"])


def activation_arguments(
    activation: str, params: Sequence[float] | None, out_dtype: torch.dtype = torch.float32,
) -> tuple[int, float, float]:
    """``(code, first parameter, second parameter)`` for :func:`dequantize_epilogue` writing
    ``out_dtype``."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    params = list(params or ())
    if activation == "Clip" and len(params) < 2:
        raise ValueError("a Clip activation needs its minimum and maximum as activation_params")
    defaults = _DEFAULTS.get(activation, (0.0, 0.0))
    first = float(params[0]) if params else defaults[0]
    second = float(params[1]) if len(params) > 1 else defaults[1]
    if activation in ("Gelu", "GeluTanh") and out_dtype in ROUGH_OUTPUTS:
        return FAST_GELU.value, first, second
    return ACTIVATION_CODES[activation], first, second


@triton.jit
def _sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


@triton.jit
def _tanh(y):
    # 1 - 2 / (exp(2y) + 1): saturates to +-1 without overflow trouble (exp(inf) gives 1 - 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)


@triton.jit
def _approximate_tanh(y):
    if HARDWARE_TANH:
        y = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [y], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        y = _tanh(y)
    return y


@triton.jit
def _softplus(y):
    return tl.where(y > SOFTPLUS_THRESHOLD, y, tl.log(1.0 + tl.exp(tl.minimum(y, SOFTPLUS_THRESHOLD))))


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr, p0, p1):
    if ACTIVATION == RELU:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(y >= 0.0, y, y * p0)
    elif ACTIVATION == ELU:
        y = tl.where(y > 0.0, y, p0 * (tl.exp(y) - 1.0))
    elif ACTIVATION == CLIP:
        y = tl.minimum(tl.maximum(y, p0), p1)
    elif ACTIVATION == SIGMOID:
        y = _sigmoid(y)
    elif ACTIVATION == HARD_SIGMOID:
        y = tl.minimum(tl.maximum(y * p0 + p1, 0.0), 1.0)
    elif ACTIVATION == TANH:
        y = _tanh(y)
    elif ACTIVATION == SILU:
        y = y * _sigmoid(y)
    elif ACTIVATION == HARD_SWISH:
        y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * INV_SQRT2))
    elif ACTIVATION == GELU_TANH:
        # constants on the right: Triton's interpreter cannot take a constexpr times a tensor
        y = 0.5 * y * (1.0 + _tanh((y + y * y * y * GELU_TANH_CUBIC) * SQRT_2_OVER_PI))
    elif ACTIVATION == FAST_GELU:
        y = 0.5 * y * (1.0 + _approximate_tanh((y + y * y * y * GELU_TANH_CUBIC) * SQRT_2_OVER_PI))
    elif ACTIVATION == MISH:
        y = y * _tanh(_softplus(y))
    elif ACTIVATION == SOFTPLUS:
        y = _softplus(y)
    return y


@triton.jit
def load_residual(residual_ptrs, mask_m, mask_n, HAS_RESIDUAL: tl.constexpr):
    """The residual tile for :func:`dequantize_epilogue` (0 without one)."""
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    else:
        residual = 0.0
    return residual


@triton.jit
def dequantize_epilogue(
    acc, offs_m, offs_n, mask_m, mask_n, row_scale_ptr, x_scale, w_scale_ptr, w_scale_stride,
    colsum_ptr, zero_point, bias_ptr, residual, residual_scale, p0, p1,
    ROW_SCALES: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr,
):
    """The layer's float32 output tile from the accumulator tile ``acc`` [BLOCK_M, BLOCK_N] and
    the ``residual`` tile's values times ``residual_scale`` (1 for a float residual, the scale of
    one handed over in 8 bits)."""
    if ZERO_POINT:
        colsum = tl.load(colsum_ptr + offs_n, mask=mask_n, other=0)
        acc = acc - zero_point * colsum[None, :]
    y = acc.to(tl.float32)
    if ROW_SCALES:
        y = y * tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    else:
        y = y * x_scale
    y = y * tl.load(w_scale_ptr + offs_n * w_scale_stride, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        residual = residual.to(tl.float32) * residual_scale
        if not RESIDUAL_AFTER:
            y = y + residual
    y = apply_activation(y, ACTIVATION, p0, p1)
    if HAS_RESIDUAL:
        if RESIDUAL_AFTER:
            y = y + residual
    return y


def quantizes_output(out_dtype: torch.dtype, out_scale: float) -> bool:
    """Whether a kernel writing ``out_dtype`` quantizes its output (with ``out_scale``)."""
    if out_dtype not in QUANTIZED_OUTPUTS:
        return False
    if not out_scale > 0:
        raise ValueError(f"a quantized {out_dtype} output needs a positive out_scale, not {out_scale}")
    return True


@triton.jit
def output_values(y, out_scale, QUANTIZED_OUT: tl.constexpr, FLOAT8_OUT: tl.constexpr):
    """The epilogue's float32 values as the output stores them: quantized with ``out_scale``
    (int8 with zero point 0, or float8_e4m3fn) when the layer hands its output over quantized."""
    if QUANTIZED_OUT:
        y = quantize_values(y, out_scale, 0.0, INT8_LOW, INT8_HIGH, FLOAT8_OUT)
    return y
