"""``kiln::LayerNorm`` and ``kiln::RMSNorm``: normalization over the trailing axes from ``axis``.

Both may add a ``residual`` to X first (pre-LN transformers: ``h = x + attn; y = norm(h)``) and
then also output that sum, for when ``h`` is read elsewhere. Statistics, scale and bias are applied
in float32 (or X's type when wider), Y rounded to X's type once, as PyTorch's and the fused kernels
compute it.

With ``q_type`` (INT8 or FLOAT8E4M3FN; 0, the default, for none) a norm also quantizes Y for the
INT8/FP8 matrix product that reads it, as that product would (:mod:`kiln.ops.quantized`,
``dynamic``): each row of Y times ``inverse_smooth`` (an optional last input, SmoothQuant's
factors) quantized with its own scale. Two more outputs, last: the quantized rows and their float32
scales (Y's shape without its last axis). The norm has the whole row at hand; a pass of its own
would read Y again (:mod:`kiln.passes.quantized_norm`).
"""

from __future__ import annotations

import torch

from kiln.ops.activation import KILN
from kiln.ops.quantized import quantized_rows
from kiln.ops.registry import register


def _with_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else x + residual


def _stats_view(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, list[int]]:
    """X widened to at least float32, and the axes to normalize over."""
    return x.to(torch.promote_types(x.dtype, torch.float32)), list(range(axis % x.dim(), x.dim()))


def writes_total(num_outputs: int, q_type: int) -> bool:
    """Whether a norm node with ``num_outputs`` outputs has one for ``x + residual``."""
    return num_outputs - (2 if q_type else 0) == 2


def norm_outputs(y: torch.Tensor, total: torch.Tensor, rows: tuple[torch.Tensor, ...], q_type: int,
                 num_outputs: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A norm node's outputs: ``y``, ``total`` when it has room for it, then the quantized rows."""
    outputs = (y, total) if writes_total(num_outputs, q_type) else (y,)
    outputs += rows
    return outputs if len(outputs) > 1 else y


def _outputs(y, total, inverse_smooth, q_type, num_outputs):
    rows = quantized_rows(y, inverse_smooth, q_type) if q_type else ()
    return norm_outputs(y, total, rows, q_type, num_outputs)


@register("LayerNorm", domain=KILN)
def layer_norm(x, scale, bias=None, residual=None, inverse_smooth=None, *, axis=-1, epsilon=1e-5,
               q_type=0, _num_outputs=1):
    total = _with_residual(x, residual)
    wide, axes = _stats_view(total, axis)
    centered = wide - wide.mean(dim=axes, keepdim=True)
    variance = (centered * centered).mean(dim=axes, keepdim=True)
    y = centered * torch.rsqrt(variance + epsilon) * scale.to(wide.dtype)
    if bias is not None:
        y = y + bias.to(wide.dtype)
    return _outputs(y.to(x.dtype), total, inverse_smooth, q_type, _num_outputs)


@register("RMSNorm", domain=KILN)
def rms_norm(x, scale, residual=None, inverse_smooth=None, *, axis=-1, epsilon=1e-5, q_type=0,
             _num_outputs=1):
    total = _with_residual(x, residual)
    wide, axes = _stats_view(total, axis)
    inverse_rms = torch.rsqrt((wide * wide).mean(dim=axes, keepdim=True) + epsilon)
    y = (wide * inverse_rms * scale.to(wide.dtype)).to(x.dtype)
    return _outputs(y, total, inverse_smooth, q_type, _num_outputs)
