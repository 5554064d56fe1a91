"""LayerNorm and RMSNorm with the residual addition in the same pass: one Triton kernel per layer.

PyTorch's fused normalization kernels take no residual, so ``x + residual`` costs a kernel of its
own: a read of both and a write of the sum, then the norm reads the sum again. Here each program
loads one row of ``x`` (and of ``residual``), forms the sum, rounded to X's type as the reference
rounds it, computes float32 statistics, and writes Y (and the sum, when the layer outputs it): one
read of each input and one write of each output. On BERT-base at batch 64 in fp16 the residual
additions and norms are about a sixth of the run.

Rows are the flattened leading axes; the normalized axis, the last, fits one block (up to
:data:`MAX_WIDTH` elements). The tuner times these choices against PyTorch's kernels.

A norm with ``q_type`` also writes its output's rows quantized for the INT8/FP8 product that reads
them (:mod:`kiln.passes.quantized_norm`): each row, as stored in Y's type, times the smoothing
factors, quantized with its abs-max's scale exactly as :func:`~kiln.kernels.triton_quantize.
quantize_rows_dynamic` would quantize it from Y.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from kiln.kernels.choice import FLOAT_TYPES, Choice, Launch, input_dtypes, with_fn
from kiln.kernels.torch_norm import normalizes_last_axis
from kiln.kernels.triton_quantize import AMAX_FLOOR, INT8_HIGH, INT8_LOW, INT8_MAX, quantize_values
from kiln.ops.activation import KILN
from kiln.ops.fused_norm import norm_outputs, writes_total
from kiln.ops.quantized import ACTIVATION_DTYPES, FLOAT8_MAX, FLOAT8E4M3FN
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

MAX_WIDTH = 16384  # one row per program, in registers


@triton.jit
def _norm_rows(
    x_ptr, residual_ptr, scale_ptr, bias_ptr, y_ptr, total_ptr, smooth_ptr, q_ptr, q_scale_ptr,
    width, epsilon, largest,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_TOTAL: tl.constexpr,
    RMS: tl.constexpr, QUANTIZE: tl.constexpr, SMOOTH: tl.constexpr, FLOAT8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64)
    row = index * width
    columns = tl.arange(0, BLOCK)
    inside = columns < width
    x = tl.load(x_ptr + row + columns, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row + columns, mask=inside, other=0.0)
        if WRITE_TOTAL:
            tl.store(total_ptr + row + columns, x, mask=inside)
    total = x.to(tl.float32)
    if RMS:
        centered = total
    else:
        mean = tl.sum(total, axis=0) / width
        centered = tl.where(inside, total - mean, 0.0)
    inverse_deviation = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + epsilon)
    y = centered * inverse_deviation * tl.load(scale_ptr + columns, mask=inside).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + columns, mask=inside).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row + columns, y, mask=inside)
    if QUANTIZE:
        v = y.to(tl.float32)
        if SMOOTH:
            v = v * tl.load(smooth_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        row_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), AMAX_FLOOR), largest)
        tl.store(q_scale_ptr + index, row_scale)
        q = quantize_values(v, row_scale, 0.0, INT8_LOW, INT8_HIGH, FLOAT8)
        tl.store(q_ptr + row + columns, q, mask=inside)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def norm_rows(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
    epsilon: float, rms: bool, write_total: bool, inverse_smooth: torch.Tensor | None = None,
    q_type: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Y, ``x + residual`` (when ``write_total``; else x) for ``x`` normalized over its last axis, and
    with ``q_type`` Y's rows quantized (times ``inverse_smooth``) and their float32 scales."""
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    width = x.shape[-1]
    y = torch.empty_like(x)
    total = torch.empty_like(x) if write_total and residual is not None else None
    float8 = q_type == FLOAT8E4M3FN
    rows_q = torch.empty(x.shape, dtype=ACTIVATION_DTYPES[q_type], device=x.device) if q_type else None
    row_scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if q_type else None
    block = triton.next_power_of_2(width)
    rows = x.numel() // width if width else 0
    if rows:
        _norm_rows[(rows,)](
            x, residual if residual is not None else x, scale.contiguous(),
            bias.contiguous() if bias is not None else scale, y, total if total is not None else y,
            inverse_smooth.contiguous() if inverse_smooth is not None else scale,
            rows_q if rows_q is not None else y, row_scales if row_scales is not None else y,
            width, epsilon, FLOAT8_MAX if float8 else INT8_MAX,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            WRITE_TOTAL=total is not None, RMS=rms, QUANTIZE=bool(q_type),
            SMOOTH=inverse_smooth is not None, FLOAT8=float8, BLOCK=block, num_warps=_warps(block),
        )
    return y, (x if residual is None else total), *((rows_q, row_scales) if q_type else ())


def _fits(spec: KernelSpec, device: str, residual_index: int) -> bool:
    """The last axis normalized, it fits a block, and the residual (if any) has X's shape."""
    if not normalizes_last_axis(spec, device):
        return False
    dtypes = input_dtypes(spec)
    if dtypes[0] not in FLOAT_TYPES:
        return False
    x = spec.input_types[0]
    width = x.shape[-1] if x is not None and x.shape else None
    if not isinstance(width, int) or not 0 < width <= MAX_WIDTH:
        return False
    if len(spec.input_types) <= residual_index or spec.input_types[residual_index] is None:
        return True
    residual = spec.input_types[residual_index]
    return residual.dtype == x.dtype and residual.shape is not None and list(residual.shape) == list(x.shape)


class TritonLayerNormChoice(Choice):
    id = "triton-layer-norm"
    op_types = ((KILN, "LayerNorm"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return _fits(spec, device, residual_index=3)

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, scale, bias=None, residual=None, inverse_smooth=None, *, epsilon=1e-5, q_type=0,
                _num_outputs=1, **_same):
            y, total, *rows = norm_rows(x, scale, bias, residual, epsilon, rms=False,
                                        write_total=writes_total(_num_outputs, q_type),
                                        inverse_smooth=inverse_smooth, q_type=q_type)
            return norm_outputs(y, total, tuple(rows), q_type, _num_outputs)

        return Launch(with_fn(reference, run))


class TritonRMSNormChoice(Choice):
    id = "triton-rms-norm"
    op_types = ((KILN, "RMSNorm"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return _fits(spec, device, residual_index=2)

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, scale, residual=None, inverse_smooth=None, *, epsilon=1e-5, q_type=0,
                _num_outputs=1, **_same):
            y, total, *rows = norm_rows(x, scale, None, residual, epsilon, rms=True,
                                        write_total=writes_total(_num_outputs, q_type),
                                        inverse_smooth=inverse_smooth, q_type=q_type)
            return norm_outputs(y, total, tuple(rows), q_type, _num_outputs)

        return Launch(with_fn(reference, run))
