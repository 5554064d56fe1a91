"""INT8/FP8 quantized layers on Triton kernels: two launches per layer, nothing in float32 torch.

``kiln::QuantizedMatMul``: the activation rows quantized in one pass
(:mod:`kiln.kernels.triton_quantize`: dynamic per-row scales after SmoothQuant's factor, or the
static scale and zero point), then one GEMM whose epilogue dequantizes, adds bias and residual,
applies the activation and writes the layer's dtype (:mod:`kiln.kernels.triton_quantized_gemm`).

``kiln::QuantizedConv`` (2-D, one group, any window, stride, padding and dilation): the input
quantized channels-last in one pass, then an implicit-GEMM convolution with the same epilogue
(:mod:`kiln.kernels.triton_quantized_conv`), its output channels-last; a 1x1 window at stride 1
without padding runs as the GEMM over the pixels (with its TMA kernel on Hopper).

Either takes its input already quantized when the layer before hands it over, skipping the
quantization pass, and writes its output quantized when it hands it on
(:mod:`kiln.passes.quantized_handoff`); a matrix product also takes rows a norm quantized, with
their scales (:mod:`kiln.passes.quantized_norm`).

Weights are laid out once, when the engine loads: a matrix column by column, a convolution
channels-last, with their sums for zero points. The choices are not ``timed_only``: quantized
specs are never timed (integer weights), so the catalog puts them first, where the untimed default
is taken. On an H100 (``benchmarks/precisions.py``, batch 64) INT8 BERT-base took 3.5 ms with them
against 26.5 ms with the cuBLASLt int8 choice and float32 quantization passes, INT8 ResNet-50
2.5 ms against 28.5 ms (fp16: 3.4 and 2.4 ms). They need Triton and a GPU with 8-bit tensor
cores; FP8 needs compute capability 8.9.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels.choice import FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, with_fn
from kiln.kernels.fp8_gemm import fp8_tensor_cores
from kiln.kernels.int8_gemm import (
    MAX_DEPTH, WeightSums, column_major, column_sums, output_channel_sums, static_dims,
)
from kiln.ops.activation import KILN
from kiln.ops.conv import resolve_pads, spans_of
from kiln.ops.quantized import (
    ACTIVATION_DTYPES, FLOAT8E4M3FN, INT8, UINT8, output_dtype, quantized_input,
)
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec


def _quantized_types(spec: KernelSpec, device: str) -> bool:
    """On CUDA, a float activation (or one a producer quantized, INT8 or FLOAT8E4M3FN) with int8
    weights for INT8/UINT8, fp8 ones for FLOAT8E4M3FN."""
    dtypes = input_dtypes(spec)
    x_type = attributes_of(spec).get("x_type", INT8)
    handed_over = dtypes[0] == x_type and x_type in (INT8, FLOAT8E4M3FN)
    if device != "cuda" or not (dtypes[0] in FLOAT_TYPES or handed_over) or len(dtypes) < 3:
        return False
    if x_type in (INT8, UINT8):
        return dtypes[1] == INT8
    return x_type == FLOAT8E4M3FN and dtypes[1] == FLOAT8E4M3FN and fp8_tensor_cores()


class TritonQuantizedMatMulChoice(Choice):
    """QuantizedMatMul: fused activation quantization, then the GEMM with the layer's epilogue."""

    id = "triton-quantized-gemm"
    op_types = ((KILN, "QuantizedMatMul"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        if not _quantized_types(spec, device):
            return False
        weight = static_dims(spec.input_types[1].shape)
        return weight is not None and len(weight) == 2 and 0 < weight[0] <= MAX_DEPTH and weight[1] > 0

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        from kiln.kernels.triton_quantize import quantize_rows_dynamic, quantize_rows_static
        from kiln.kernels.triton_quantized_gemm import quantized_gemm

        sums = WeightSums(column_sums)

        def prepare(w: torch.Tensor) -> torch.Tensor:
            return sums.remember(column_major(w))

        def run(x, w_q, w_scale, bias=None, residual=None, x_inverse_smooth=None, x_row_scale=None,
                *, x_scale=0.0, x_zero_point=0, x_type=INT8, dynamic=0, activation="",
                activation_params=None, residual_after_activation=0, y_type=0, y_scale=0.0,
                float_type=0, residual_scale=0.0, **_same_as_reference):
            k, n = w_q.shape
            w_cols = column_major(w_q)
            float8 = x_type == FLOAT8E4M3FN
            rows = x.reshape(-1, k)
            zero_point8 = 0
            if x_row_scale is not None:  # quantized by the norm before
                q, scale = rows.contiguous(), x_row_scale.reshape(-1).to(torch.float32)
            elif quantized_input(x, x_type):
                q, scale = rows.contiguous(), x_scale
                zero_point8 = 0 if float8 else x_zero_point
            elif dynamic:
                q, scale = quantize_rows_dynamic(rows, x_inverse_smooth, float8)
            else:
                if x_inverse_smooth is not None:
                    rows = rows.to(torch.float32) * x_inverse_smooth.to(torch.float32)
                q, zero_point8 = quantize_rows_static(rows, x_scale, x_zero_point, x_type, float8)
                scale = x_scale
            colsum = sums.of(w_cols) if zero_point8 else None
            if residual is not None:
                residual = residual.expand(*x.shape[:-1], n).reshape(-1, n)
            y = quantized_gemm(
                q, w_cols, scale, w_scale.to(torch.float32), zero_point=zero_point8, colsum=colsum,
                bias=bias, residual=residual, residual_after_activation=residual_after_activation,
                activation=activation, activation_params=activation_params,
                **_output(x, x_type, float_type, y_type, y_scale, residual_scale),
            )
            return y.reshape(*x.shape[:-1], n)

        return Launch(with_fn(reference, run), {1: prepare})


class TritonQuantizedConvChoice(Choice):
    """QuantizedConv in 2-D with one group: fused input quantization, then the implicit GEMM."""

    id = "triton-quantized-conv"
    op_types = ((KILN, "QuantizedConv"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        if not _quantized_types(spec, device):
            return False
        weight = static_dims(spec.input_types[1].shape)
        x_shape = spec.input_types[0].shape
        if weight is None or len(weight) != 4 or x_shape is None or len(x_shape) != 4:
            return False
        return (
            attributes_of(spec).get("group", 1) == 1
            and weight[0] > 0
            and 0 < weight[1] * weight[2] * weight[3] <= MAX_DEPTH
        )

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        from kiln.kernels.triton_quantize import quantize_rows_static
        from kiln.kernels.triton_quantized_conv import quantized_conv2d

        sums = WeightSums(output_channel_sums)

        def prepare(w: torch.Tensor) -> torch.Tensor:
            return sums.remember(w.contiguous(memory_format=torch.channels_last))

        def run(x, w_q, w_scale, bias=None, residual=None, *, x_scale, x_zero_point=0,
                x_type=INT8, auto_pad="NOTSET", dilations=None, pads=None, strides=None,
                activation="", activation_params=None, residual_after_activation=0, y_type=0,
                y_scale=0.0, float_type=0, residual_scale=0.0, **_same_as_reference):
            batch, channels, height, width = x.shape
            kernel = list(w_q.shape[2:])
            dilations = list(dilations or [1, 1])
            strides = list(strides or [1, 1])
            spans = spans_of(kernel, dilations)
            begin, end = resolve_pads(auto_pad, pads, [height, width], spans, strides)
            output_size = [(size + b + e - span) // stride + 1
                           for size, b, e, span, stride in zip([height, width], begin, end, spans, strides)]
            float8 = x_type == FLOAT8E4M3FN
            pixels = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            if quantized_input(x, x_type):
                q, zero_point8 = pixels.reshape(-1, channels), 0 if float8 else x_zero_point
            else:
                q, zero_point8 = quantize_rows_static(
                    pixels.reshape(-1, channels), x_scale, x_zero_point, x_type, float8
                )
            colsum = sums.of(w_q) if zero_point8 else None
            output = _output(x, x_type, float_type, y_type, y_scale, residual_scale)
            if kernel == [1, 1] and strides == [1, 1] and not any(begin) and not any(end):
                return _pixel_gemm(
                    q, w_q, x_scale, w_scale, colsum, zero_point8, bias, residual,
                    residual_after_activation, activation, activation_params, x, output,
                )
            return quantized_conv2d(
                q.view(batch, height, width, channels), w_q, x_scale, w_scale.to(torch.float32),
                strides=strides, pads=begin, dilations=dilations, output_size=output_size,
                zero_point=zero_point8, colsum=colsum, bias=bias, residual=residual,
                residual_after_activation=residual_after_activation, activation=activation,
                activation_params=activation_params, **output,
            )

        return Launch(with_fn(reference, run), {1: prepare})


def _output(x: torch.Tensor, x_type: int, float_type: int, y_type: int, y_scale: float,
            residual_scale: float) -> dict[str, Any]:
    """The kernels' ``out_dtype``, ``out_scale`` and ``residual_scale`` for a layer's output (see
    :mod:`kiln.ops.quantized`): its float type, or the next layer's quantized one."""
    handed = {"residual_scale": residual_scale or 1.0}
    if y_type:
        return {**handed, "out_dtype": ACTIVATION_DTYPES[y_type], "out_scale": y_scale}
    return {**handed, "out_dtype": output_dtype(x, x_type, float_type)}


def _pixel_gemm(q, w_q, x_scale, w_scale, colsum, zero_point, bias, residual,
                residual_after_activation, activation, activation_params, x, output):
    """A 1x1 convolution at stride 1 without padding: the quantized GEMM over the pixels' rows,
    its output channels-last. The channels-last weight [O, C, 1, 1] is the GEMM's [C, O] weight
    laid out column by column."""
    from kiln.kernels.triton_quantized_gemm import quantized_gemm

    batch, _, height, width = x.shape
    out_channels, channels = w_q.shape[:2]
    if residual is not None:
        residual = residual.expand(batch, out_channels, height, width).permute(0, 2, 3, 1)
        residual = residual.reshape(-1, out_channels)
    y = quantized_gemm(
        q, w_q.reshape(out_channels, channels).t(), x_scale, w_scale.to(torch.float32),
        zero_point=zero_point, colsum=colsum, bias=bias, residual=residual,
        residual_after_activation=residual_after_activation, activation=activation,
        activation_params=activation_params, **output,
    )
    return y.view(batch, height, width, out_channels).permute(0, 3, 1, 2)
