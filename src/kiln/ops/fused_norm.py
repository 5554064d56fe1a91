"""``kiln::LayerNorm`` and ``kiln::RMSNorm``: normalization over the trailing axes from ``axis``.

Both may add a ``residual`` to X first (pre-LN transformers: ``h = x + attn; y = norm(h)``) and
then also output that sum, for when ``h`` is read elsewhere. Statistics are computed in float32
(or X's type when wider); Y has X's type.
"""

from __future__ import annotations

import torch

from kiln.ops.activation import KILN
from kiln.ops.registry import register


def _with_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else x + residual


def _stats_view(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, list[int]]:
    """X widened to at least float32, and the axes to normalize over."""
    return x.to(torch.promote_types(x.dtype, torch.float32)), list(range(axis % x.dim(), x.dim()))


@register("LayerNorm", domain=KILN)
def layer_norm(x, scale, bias=None, residual=None, *, axis=-1, epsilon=1e-5, _num_outputs=1):
    total = _with_residual(x, residual)
    wide, axes = _stats_view(total, axis)
    centered = wide - wide.mean(dim=axes, keepdim=True)
    variance = (centered * centered).mean(dim=axes, keepdim=True)
    y = (centered * torch.rsqrt(variance + epsilon)).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, total) if _num_outputs == 2 else y


@register("RMSNorm", domain=KILN)
def rms_norm(x, scale, residual=None, *, axis=-1, epsilon=1e-5, _num_outputs=1):
    total = _with_residual(x, residual)
    wide, axes = _stats_view(total, axis)
    inverse_rms = torch.rsqrt((wide * wide).mean(dim=axes, keepdim=True) + epsilon)
    y = (wide * inverse_rms).to(x.dtype) * scale
    return (y, total) if _num_outputs == 2 else y
