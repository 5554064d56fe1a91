"""INT8 quantized layers on int8 tensor cores: cuBLASLt's int8 GEMM (``torch._int_mm``).

The activation is quantized to int8 (UINT8 shifted by -128, see
:func:`~kiln.ops.quantized.quantize_activation_int8`), multiplied by the int8 weight with int32
accumulation, which is exact, and the zero point's share ``zero_point8 * colsum(w_q)`` taken away
in int32. What is left is float: ``acc * x_scale * w_scale + bias``, the epilogue, the cast to
x's dtype, as :mod:`kiln.ops.quantized` defines the layer.

``torch._int_mm`` needs K and N multiples of 8 and more than 16 rows; it runs on CUDA 13 for a
row-major activation and a column-major weight, so weights are laid out column-major once, when
the engine loads, and their column sums computed then too. Fewer rows (a batch of one, a
symbolic batch that turns out small) are padded with zero rows to 17, which costs less than the
reference's float weights. A 1x1 convolution with stride 1, no padding and one group is the same
GEMM over pixels, reading the channels-last input without a copy.

These choices are not ``timed_only``: they never lose to the ``ops`` reference (which dequantizes
the whole weight to float32 at every call), and quantized specs, whose weights are integers, are
never timed anyway: the untimed default is the first supporting choice. On an H100 in a CUDA
graph, 4096x4096 weights: 0.03 ms against the reference's 0.16 ms for one row, 1.2 ms against
6.5 ms for 8192 rows. Quantizing the activation in PyTorch's elementwise ops costs more than the
GEMM itself at many rows (about half of those 1.2 ms): a fused quantization kernel is what would
take these layers below fp16's time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from kiln.kernels.choice import (
    FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, with_fn,
)
from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.quantized import INT8, UINT8, matmul_activation, quantize_activation_int8
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

MIN_ROWS = 17  # torch._int_mm takes more than 16 rows
ALIGNMENT = 8  # K and N of torch._int_mm
# The exact result, |sum (xq - zp) * w| <= 255 * 128 * K, must fit int32.
MAX_DEPTH = (2**31 - 1) // (255 * 128)


def column_major(w: torch.Tensor) -> torch.Tensor:
    """A 2-D ``w`` with the same values, laid out column by column (what cuBLASLt reads as B)."""
    if w.stride(0) == 1 and w.stride(1) >= max(1, w.shape[0]):
        return w
    return w.t().contiguous().t()


def static_dims(dims) -> list[int] | None:
    """``dims`` as a list when every one is a known size, else None."""
    return list(dims) if dims is not None and all(isinstance(d, int) for d in dims) else None


def output_channel_sums(w: torch.Tensor) -> torch.Tensor:
    """The int32 sum of each output channel (axis 0) of a weight, over all its other axes."""
    return w.reshape(w.shape[0], -1).sum(1, dtype=torch.int32)


def column_sums(w: torch.Tensor) -> torch.Tensor:
    """The int32 sum of each column of a [K, N] weight."""
    return w.sum(0, dtype=torch.int32)


class WeightSums:
    """The int32 sums of each prepared int8 weight that a zero point's correction subtracts:
    computed once, when the engine loads (:meth:`remember`), or at the call for a weight that
    was not prepared."""

    def __init__(self, sum_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._sum_of = sum_of
        self._sums: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def remember(self, w: torch.Tensor) -> torch.Tensor:
        if w.dtype == torch.int8:
            self._sums[w] = self._sum_of(w)
        return w

    def of(self, w: torch.Tensor) -> torch.Tensor:
        cached = self._sums.get(w)
        return cached if cached is not None else self._sum_of(w)


def _gemm_sized(k: int, n: int) -> bool:
    return 0 < k <= MAX_DEPTH and k % ALIGNMENT == 0 and n > 0 and n % ALIGNMENT == 0


def _integer_activation(spec: KernelSpec, device: str) -> bool:
    dtypes = input_dtypes(spec)
    attributes = attributes_of(spec)
    return (
        device == "cuda"
        and dtypes[0] in FLOAT_TYPES
        and len(dtypes) > 2 and dtypes[1] == INT8
        and attributes.get("x_type", INT8) in (INT8, UINT8)
        # 8-bit values handed over, out or in as a residual: Triton's epilogue
        and not attributes.get("y_type", 0) and not attributes.get("residual_scale", 0.0)
    )


def int8_product(rows: torch.Tensor, w_cols: torch.Tensor) -> torch.Tensor:
    """``rows @ w_cols`` in int32: rows int8 [M, K] row-major, w_cols int8 [K, N] column-major."""
    m = rows.shape[0]
    if m >= MIN_ROWS:
        return torch._int_mm(rows, w_cols)
    return torch._int_mm(F.pad(rows, (0, 0, 0, MIN_ROWS - m)), w_cols)[:m]


def dequantized_product(
    xq8: torch.Tensor, zero_point8: int, x_scale: float | torch.Tensor, w_cols: torch.Tensor,
    colsum: Callable[[], torch.Tensor], w_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x_dq @ w + bias`` in float32 from int8 activation rows ``xq8`` [M, K] and their zero
    point; ``x_scale`` is one number or one per row ([M, 1])."""
    acc = int8_product(xq8.contiguous(), w_cols)
    if zero_point8:
        acc = acc.sub_(colsum(), alpha=zero_point8)  # int32, exact
    if isinstance(x_scale, torch.Tensor):
        y = acc * x_scale * w_scale.to(torch.float32)
        return y if bias is None else y.add_(bias.to(torch.float32))
    if bias is None:
        return acc * (w_scale.to(torch.float32) * x_scale)
    return torch.addcmul(bias.to(torch.float32), acc, w_scale.to(torch.float32), value=x_scale)


class CublasLtInt8GemmChoice(Choice):
    """QuantizedMatMul with an INT8/UINT8 activation: one int8 GEMM over the flattened rows."""

    id = "int8-gemm"
    op_types = ((KILN, "QuantizedMatMul"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        if not _integer_activation(spec, device):
            return False
        weight = static_dims(spec.input_types[1].shape)
        return weight is not None and len(weight) == 2 and _gemm_sized(*weight)

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        sums = WeightSums(column_sums)

        def prepare(w: torch.Tensor) -> torch.Tensor:
            return sums.remember(column_major(w))

        def run(x, w_q, w_scale, bias=None, residual=None, x_inverse_smooth=None, *, x_scale=0.0,
                x_zero_point=0, x_type=INT8, dynamic=0, activation="", activation_params=None,
                residual_after_activation=0, **_same_as_reference):
            k, n = w_q.shape
            w_cols = column_major(w_q)
            values, scale = matmul_activation(x, x_inverse_smooth, x_scale, x_type, dynamic)
            zero_point = 0 if dynamic else x_zero_point
            xq8, zero_point8 = quantize_activation_int8(values, scale, zero_point, x_type)
            rows_scale = scale.reshape(-1, 1) if isinstance(scale, torch.Tensor) else scale
            y = dequantized_product(
                xq8.reshape(-1, k), zero_point8, rows_scale, w_cols, lambda: sums.of(w_cols),
                w_scale, bias,
            )
            y = y.reshape(*x.shape[:-1], n)
            y = apply_epilogue(y, residual, activation, activation_params, residual_after_activation)
            return y.to(x.dtype)

        return Launch(with_fn(reference, run), {1: prepare})


class CublasLtInt8Conv1x1Choice(Choice):
    """QuantizedConv with a 1x1 kernel, stride 1, no padding, one group: the int8 GEMM over pixels.

    On channels-last input (what the cuDNN choices leave behind) the pixels are the rows of a
    row-major matrix as they lie; the output is channels-last too.
    """

    id = "int8-conv1x1"
    op_types = ((KILN, "QuantizedConv"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        if not _integer_activation(spec, device):
            return False
        attributes = attributes_of(spec)
        weight = static_dims(spec.input_types[1].shape)
        x_shape = spec.input_types[0].shape
        if weight is None or len(weight) < 3 or x_shape is None or len(x_shape) != len(weight):
            return False
        spatial = len(weight) - 2
        ones = [1] * spatial
        return (
            weight[2:] == ones
            and attributes.get("group", 1) == 1
            and list(attributes.get("strides") or ones) == ones
            and not any(attributes.get("pads") or [])
            # with a 1x1 kernel and stride 1, SAME padding pads nothing
            and attributes.get("auto_pad", "NOTSET") in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
            and _gemm_sized(weight[1], weight[0])
        )

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        sums = WeightSums(output_channel_sums)

        def prepare(w: torch.Tensor) -> torch.Tensor:
            return sums.remember(w.contiguous())

        def run(x, w_q, w_scale, bias=None, residual=None, *, x_scale, x_zero_point=0,
                x_type=INT8, activation="", activation_params=None, residual_after_activation=0,
                **_conv_attributes):
            out_channels, in_channels = w_q.shape[:2]
            w_rows = w_q.reshape(out_channels, in_channels)  # [O, C]; its transpose is [K, N]

            xq8, zero_point8 = quantize_activation_int8(x, x_scale, x_zero_point, x_type)
            # [N, D1, ..., C]: a view, whose rows lie row-major when x is channels-last; else an
            # int8 copy
            pixels = xq8.movedim(1, -1)
            y = dequantized_product(
                pixels.reshape(-1, in_channels), zero_point8, x_scale, column_major(w_rows.t()),
                lambda: sums.of(w_q), w_scale, bias,
            )
            y = y.reshape(*pixels.shape[:-1], out_channels).movedim(-1, 1)
            y = apply_epilogue(y, residual, activation, activation_params, residual_after_activation)
            return y.to(x.dtype)

        return Launch(with_fn(reference, run), {1: prepare})

