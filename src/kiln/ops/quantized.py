"""``kiln::QuantizedMatMul`` and ``kiln::QuantizedConv``: INT8/FP8 layers, defined by fake quantization.

:class:`~kiln.passes.quantize.QuantizeLayers` makes them of Conv, MatMul, Gemm and their fused
forms. Their inputs are ``(x, w_q, w_scale, bias?, residual?)``:

- ``x``: the float activation (float32, float16 or bfloat16); ``[..., K]`` for QuantizedMatMul,
  ``[N, C, D1, ...]`` for QuantizedConv.
- ``w_q``: the quantized weight, int8 when ``x_type`` is INT8 or UINT8, float8_e4m3fn when it is
  FLOAT8E4M3FN; ``[K, N]`` for QuantizedMatMul, ``[O, C/group, k1, ...]`` for QuantizedConv.
- ``w_scale``: float32, one scale per output channel (``[N]``, ``[O]``; one element applies to all).
- ``bias``: float, one value per output channel, optional. ``residual``: float, broadcastable to the
  output, optional.

QuantizedMatMul takes a sixth input, ``x_inverse_smooth`` (float32 ``[K]``, optional): the
activation is multiplied by it before quantization (SmoothQuant: the weight carries the inverse,
moving activation outliers into the weight), and an attribute ``dynamic`` (default 0): 1 quantizes
each row of the activation with its own scale, its abs-max over 127 (int8) or 448 (fp8), zero
point 0, instead of ``x_scale``. A seventh input, ``x_row_scale`` (float32, x's shape without its
last axis), says x comes already quantized that way, by the norm before it
(:func:`quantized_rows`, :mod:`kiln.ops.fused_norm`): ``x_dq = x * x_row_scale`` per row, no
``dynamic``, no smoothing (the norm applied it).

Quantized layers hand their output to the next one already quantized
(:class:`~kiln.passes.quantized_handoff.HandOffQuantized`): with ``y_type`` (INT8 or FLOAT8E4M3FN;
0, the default, writes the float output) a layer's output is ``quantize_activation(y, y_scale, 0,
y_type)``, int8 or float8_e4m3fn values computed from the float32 result, and a layer whose ``x``
comes in those values reads them as ``x_dq = dequantize_activation(x, x_scale, x_zero_point)``
(static scales only: no ``dynamic``, no smoothing); its float output is then of
``float_type`` (an ONNX element type), not x's. A layer reading such values as its residual
dequantizes them with ``residual_scale`` first (0, the default: a float residual).

Attributes: ``x_scale`` (float, required unless ``dynamic``), ``x_zero_point`` (int, default 0; FLOAT8E4M3FN takes
none: it is ignored there), ``x_type`` (the ONNX element type the activation is quantized to: 3
INT8, 2 UINT8, 17 FLOAT8E4M3FN; default INT8), the epilogue's ``activation``,
``activation_params`` and ``residual_after_activation`` as in ``kiln::FusedMatMul``, and, for
QuantizedConv, Conv's ``auto_pad``, ``dilations``, ``group``, ``kernel_shape``, ``pads``,
``strides``.

The result, which every kernel choice computes (:func:`quantize_activation` and
:func:`dequantize_activation` are the helpers they share):

- integer ``x_type``: ``xq = clamp(round_half_to_even(x / x_scale) + x_zero_point, qmin, qmax)``
  with ``(qmin, qmax)`` = (-128, 127) for INT8 and (0, 255) for UINT8;
  ``x_dq = (xq - x_zero_point) * x_scale``;
- FLOAT8E4M3FN: ``xq = float8_e4m3fn(clamp(x / x_scale, -448, 448))`` (round to nearest even),
  ``x_dq = xq * x_scale``;
- ``w = w_q * w_scale`` (per output channel), ``y = x_dq @ w + bias`` (QuantizedMatMul) or
  ``y = conv(x_dq, w) + bias`` (QuantizedConv), then the epilogue ``act(y + residual)``, or
  ``act(y) + residual`` with ``residual_after_activation=1``.

Everything is computed in float32 (``x / x_scale`` is a float32 division; on CUDA, PyTorch divides
by a Python number as a product with its float32 reciprocal, which differs by at most one unit in
the last place) and the output is cast to x's dtype. The int8 kernels' integer products are exact
(int32 accumulation), so they differ from this reference by float rounding only; fp8 tensor cores
sum in their own precision (see :mod:`kiln.kernels.fp8_gemm`). Inputs that are NaN have no defined
quantized value.
"""

from __future__ import annotations

import torch
from onnx import TensorProto

from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.conv import conv
from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register

INT8 = TensorProto.INT8  # 3
UINT8 = TensorProto.UINT8  # 2
FLOAT8E4M3FN = TensorProto.FLOAT8E4M3FN  # 17
INTEGER_RANGES = {INT8: (-128, 127), UINT8: (0, 255)}
FLOAT8_MAX = 448.0  # float8_e4m3fn's largest finite value
TINY_ABS_MAX = 1e-12  # an all-zero row still needs a positive scale
# The storage dtype of each activation type, and the dtype its weights come in.
ACTIVATION_DTYPES = {INT8: torch.int8, UINT8: torch.uint8, FLOAT8E4M3FN: torch.float8_e4m3fn}
WEIGHT_DTYPES = {INT8: torch.int8, UINT8: torch.int8, FLOAT8E4M3FN: torch.float8_e4m3fn}


def _check_type(x_type: int) -> None:
    if x_type not in ACTIVATION_DTYPES:
        raise ValueError(
            f"quantized layers take x_type INT8 ({INT8}), UINT8 ({UINT8}) or FLOAT8E4M3FN "
            f"({FLOAT8E4M3FN}), not {x_type}"
        )


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` in float32, as a new tensor (in place operations may follow)."""
    return x.to(torch.float32) / scale


def _round_and_saturate(scaled: torch.Tensor, zero_point: int, low: int, high: int) -> torch.Tensor:
    # Rounded values are integers, exact in float32 up to 2**24; beyond that they saturate anyway.
    q = scaled.round_()  # half to even
    if zero_point:
        q = q.add_(zero_point)
    return q.clamp_(low, high)


def quantize_activation(
    x: torch.Tensor, scale: float, zero_point: int = 0, x_type: int = INT8
) -> torch.Tensor:
    """``x`` quantized as the module's docstring says: int8, uint8 or float8_e4m3fn values."""
    _check_type(x_type)
    scaled = _scaled(x, scale)
    if x_type == FLOAT8E4M3FN:
        return scaled.clamp_(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    low, high = INTEGER_RANGES[x_type]
    return _round_and_saturate(scaled, zero_point, low, high).to(ACTIVATION_DTYPES[x_type])


def quantize_activation_int8(
    x: torch.Tensor, scale: float, zero_point: int = 0, x_type: int = INT8
) -> tuple[torch.Tensor, int]:
    """``x`` quantized to int8 storage for int8 tensor cores: ``(xq8, zero_point8)``.

    INT8 values are :func:`quantize_activation`'s. UINT8 values are shifted by -128 into int8,
    zero point included, so ``xq8 - zero_point8 == xq - zero_point`` for every element.
    """
    if x_type not in INTEGER_RANGES:
        raise ValueError(f"int8 storage takes x_type INT8 ({INT8}) or UINT8 ({UINT8}), not {x_type}")
    shift = -128 if x_type == UINT8 else 0
    low, high = INTEGER_RANGES[x_type]
    q = _round_and_saturate(_scaled(x, scale), zero_point + shift, low + shift, high + shift)
    return q.to(torch.int8), zero_point + shift


def dequantize_activation(xq: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    """``(xq - zero_point) * scale`` in float32 (float8 values take no zero point)."""
    values = xq.to(torch.float32)
    if zero_point and not xq.dtype.is_floating_point:
        values = values - zero_point
    return values * scale


def fake_quantize_activation(
    x: torch.Tensor, scale: float, zero_point: int = 0, x_type: int = INT8
) -> torch.Tensor:
    """``x`` as the layer sees it: quantized, then dequantized (float32)."""
    zero_point = 0 if x_type == FLOAT8E4M3FN else zero_point
    return dequantize_activation(quantize_activation(x, scale, zero_point, x_type), scale, zero_point)


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``w_q * w_scale`` in float32, ``w_scale`` holding one scale per index of ``axis``."""
    shape = [1] * w_q.dim()
    if w_scale.numel() > 1:
        shape[axis] = w_scale.numel()
    return w_q.to(torch.float32) * w_scale.to(torch.float32).reshape(shape)


def row_scales(x: torch.Tensor, x_type: int = INT8) -> torch.Tensor:
    """Dynamic per-row scales ``[..., 1]``: each row's abs-max over the format's largest value."""
    largest = FLOAT8_MAX if x_type == FLOAT8E4M3FN else float(INTEGER_RANGES[INT8][1])
    return x.abs().amax(dim=-1, keepdim=True).to(torch.float32).clamp_(min=TINY_ABS_MAX) / largest


def matmul_activation(
    x: torch.Tensor, inverse_smooth: torch.Tensor | None, x_scale: float, x_type: int, dynamic: int,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """QuantizedMatMul's activation before quantization (float32, smoothed) and its scale: the
    ``x_scale`` attribute, or per-row scales when ``dynamic``."""
    values = x.to(torch.float32)
    if inverse_smooth is not None:
        values = values * inverse_smooth.to(torch.float32)
    return values, row_scales(values, x_type) if dynamic else x_scale


def quantized_rows(
    y: torch.Tensor, inverse_smooth: torch.Tensor | None, x_type: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``y`` as a QuantizedMatMul with ``dynamic`` quantizes them: ``(values of
    x_type, float32 scales of y's shape without its last axis)``."""
    values, scales = matmul_activation(y, inverse_smooth, 0.0, x_type, dynamic=1)
    return quantize_activation(values, scales, 0, x_type), scales.squeeze(-1)


def quantized_input(x: torch.Tensor, x_type: int) -> bool:
    """Whether a quantized layer's ``x`` comes quantized (a producer's ``y_type``), not in float."""
    _check_type(x_type)
    if x.dtype.is_floating_point and x.dtype != torch.float8_e4m3fn:
        return False
    if x.dtype != ACTIVATION_DTYPES[x_type]:
        raise ValueError(f"a quantized layer's x of x_type {x_type} comes as {ACTIVATION_DTYPES[x_type]}, "
                         f"not {x.dtype}")
    return True


def output_dtype(x: torch.Tensor, x_type: int, float_type: int) -> torch.dtype:
    """The float type of a quantized layer's output: x's, or ``float_type`` when x comes quantized."""
    return torch_dtype(float_type or TensorProto.FLOAT) if quantized_input(x, x_type) else x.dtype


def _finish(y, residual, activation, activation_params, residual_after_activation, dtype,
            y_type, y_scale, residual_scale):
    if residual is not None and residual_scale:
        residual = dequantize_activation(residual, residual_scale)
    y = apply_epilogue(y, residual, activation, activation_params, residual_after_activation)
    if y_type:
        return quantize_activation(y, y_scale, 0, y_type)
    return y.to(dtype)


@register("QuantizedMatMul", domain=KILN)
def quantized_matmul(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    x_inverse_smooth: torch.Tensor | None = None, x_row_scale: torch.Tensor | None = None,
    *, x_scale: float = 0.0, x_zero_point: int = 0, x_type: int = INT8, dynamic: int = 0,
    activation: str = "", activation_params: list[float] | None = None,
    residual_after_activation: int = 0, y_type: int = 0, y_scale: float = 0.0, float_type: int = 0,
    residual_scale: float = 0.0,
) -> torch.Tensor:
    if quantized_input(x, x_type):
        if dynamic or x_inverse_smooth is not None:
            raise ValueError("a QuantizedMatMul whose x comes quantized takes no dynamic scales "
                             "and no smoothing")
        if x_row_scale is not None:
            x_dq = x.to(torch.float32) * x_row_scale.to(torch.float32).unsqueeze(-1)
        else:
            x_dq = dequantize_activation(x, x_scale, x_zero_point)
    elif x_row_scale is not None:
        raise ValueError(f"a QuantizedMatMul given row scales takes x quantized, not in {x.dtype}")
    else:
        values, scale = matmul_activation(x, x_inverse_smooth, x_scale, x_type, dynamic)
        x_dq = fake_quantize_activation(values, scale, 0 if dynamic else x_zero_point, x_type)
    y = torch.matmul(x_dq, dequantize_weight(w_q, w_scale, axis=-1))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return _finish(y, residual, activation, activation_params, residual_after_activation,
                   output_dtype(x, x_type, float_type), y_type, y_scale, residual_scale)


@register("QuantizedConv", domain=KILN)
def quantized_conv(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    *, x_scale: float, x_zero_point: int = 0, x_type: int = INT8,
    auto_pad: str = "NOTSET", dilations: list[int] | None = None, group: int = 1,
    kernel_shape: list[int] | None = None, pads: list[int] | None = None,
    strides: list[int] | None = None, activation: str = "",
    activation_params: list[float] | None = None, residual_after_activation: int = 0,
    y_type: int = 0, y_scale: float = 0.0, float_type: int = 0, residual_scale: float = 0.0,
) -> torch.Tensor:
    if quantized_input(x, x_type):
        x_dq = dequantize_activation(x, x_scale, x_zero_point)
    else:
        x_dq = fake_quantize_activation(x, x_scale, x_zero_point, x_type)
    w = dequantize_weight(w_q, w_scale, axis=0)
    y = conv(x_dq, w, None if bias is None else bias.to(torch.float32), auto_pad=auto_pad,
             dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads, strides=strides)
    return _finish(y, residual, activation, activation_params, residual_after_activation,
                   output_dtype(x, x_type, float_type), y_type, y_scale, residual_scale)
