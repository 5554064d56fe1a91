"""Convolutions (Conv, ConvTranspose, DeformConv) and pooling (Max/Average/Lp, global, MaxUnpool).

Inputs are (N, C, D1, ..., Dn). ONNX allows asymmetric padding, which torch's functions do not, so
padding is applied explicitly (``F.pad``) whenever the two sides differ; negative amounts crop.
Pooling windows cover the input padded by ``pads`` (or by ``auto_pad``), plus, in ``ceil_mode``,
trailing room for a last partial window; ONNX's rules decide which of those positions count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.ops.registry import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


# --- Geometry -------------------------------------------------------------------------------------


def _or_ones(values: Sequence[int] | None, n: int) -> list[int]:
    return list(values) if values else [1] * n


def spans_of(kernel: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """How many input positions a dilated kernel covers, per axis."""
    return [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]


def resolve_pads(
    auto_pad: str,
    pads: Sequence[int] | None,
    sizes: Sequence[int],
    spans: Sequence[int],
    strides: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(padding before, padding after) per spatial axis."""
    n = len(sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, span, stride in zip(sizes, spans, strides):
            out = -(-size // stride)
            total = max(0, (out - 1) * stride + span - size)
            # An odd total puts the extra position at the end (UPPER) or the beginning (LOWER).
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def _pad_spatial(
    x: torch.Tensor, begin: Sequence[int], end: Sequence[int], value: float = 0.0
) -> torch.Tensor:
    if not any(begin) and not any(end):
        return x
    # F.pad lists the last axis first.
    amounts = [a for pair in zip(reversed(begin), reversed(end)) for a in pair]
    return F.pad(x, amounts, value=value)


@dataclass(frozen=True)
class Pooling:
    """Where a pooling op's windows lie: on the input padded by ``begin``/``end``, then extended
    (or cut) to ``padded_end`` so that exactly ``out`` windows fit."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]
    padded_end: list[int]
    out: list[int]


def pooling(
    x: torch.Tensor,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None,
    dilations: Sequence[int] | None,
    pads: Sequence[int] | None,
    auto_pad: str,
    ceil_mode: int,
) -> Pooling:
    sizes = list(x.shape[2:])
    n = len(sizes)
    strides, dilations = _or_ones(strides, n), _or_ones(dilations, n)
    spans = spans_of(kernel_shape, dilations)
    begin, end = resolve_pads(auto_pad, pads, sizes, spans, strides)
    out, padded_end = [], []
    for size, span, stride, b, e in zip(sizes, spans, strides, begin, end):
        room = size + b + e - span
        count = (-(-room // stride) if ceil_mode else room // stride) + 1
        if ceil_mode and (count - 1) * stride >= size + b:
            count -= 1  # the last window would start in the end padding
        out.append(count)
        padded_end.append((count - 1) * stride + span - size - b)
    return Pooling(list(kernel_shape), strides, dilations, begin, end, padded_end, out)


def _lowest(dtype: torch.dtype) -> float | int:
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


# --- Convolutions ---------------------------------------------------------------------------------


@register("Conv", since=1)
def conv(
    x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
    strides=None,
):
    n = x.dim() - 2
    strides, dilations = _or_ones(strides, n), _or_ones(dilations, n)
    begin, end = resolve_pads(
        auto_pad, pads, x.shape[2:], spans_of(w.shape[2:], dilations), strides
    )
    padding = begin
    if begin != end:
        x, padding = _pad_spatial(x, begin, end), [0] * n
    return _CONV[n](x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)


def _transposed_window(
    extended: int, in_size: int, stride: int, auto_pad: str, pads: tuple[int, int],
    wanted: int | None,
) -> tuple[int, int]:
    """(start, size) of ConvTranspose's output within the full result extended by output_padding."""
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    if wanted is None and not same:
        before, after = pads if auto_pad == "NOTSET" else (0, 0)
        return before, extended - before - after
    size = wanted if wanted is not None else in_size * stride
    total = extended - size
    if not same:
        total = max(0, total)  # an output_shape beyond the full result extends only its end
    # An odd total leaves the extra position at the end for SAME_UPPER, the start otherwise.
    return (total // 2 if auto_pad == "SAME_UPPER" else total - total // 2), size


@register("ConvTranspose", since=1)
def conv_transpose(
    x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
    output_padding=None, output_shape=None, pads=None, strides=None,
):
    n = x.dim() - 2
    strides, dilations = _or_ones(strides, n), _or_ones(dilations, n)
    output_padding = list(output_padding) if output_padding else [0] * n
    pads = list(pads) if pads else [0] * (2 * n)
    full = _CONV_TRANSPOSE[n](x, w, stride=strides, dilation=dilations, groups=group)
    begin, end = [], []
    for i, full_size in enumerate(full.shape[2:]):
        start, size = _transposed_window(
            full_size + output_padding[i], x.shape[2 + i], strides[i], auto_pad,
            (pads[i], pads[n + i]), output_shape[i] if output_shape else None,
        )
        begin.append(-start)  # negative padding crops
        end.append(start + size - full_size)
    y = _pad_spatial(full, begin, end)
    if b is not None:
        y = y + b.reshape(-1, *([1] * n))
    return y


def _bilinear_samples(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Multilinear interpolation of x (N, G, Cg, *S) at positions (N, G, P, n); zero outside.

    Returns (N, G, Cg, P)."""
    sizes = x.shape[3:]
    flat = x.flatten(3)
    low = torch.floor(positions)
    frac = positions - low
    low = low.long()
    result = 0
    for corner in itertools.product((0, 1), repeat=len(sizes)):
        index = torch.zeros_like(low[..., 0])
        weight = torch.ones_like(frac[..., 0])
        inside = torch.ones_like(index, dtype=torch.bool)
        for d, (step, size) in enumerate(zip(corner, sizes)):
            coord = low[..., d] + step
            weight = weight * (frac[..., d] if step else 1 - frac[..., d])
            inside &= (coord >= 0) & (coord < size)
            index = index * size + coord.clamp(0, size - 1)
        gathered = torch.gather(flat, 3, index.unsqueeze(2).expand(-1, -1, flat.shape[2], -1))
        result = result + gathered * (weight * inside).unsqueeze(2)
    return result


@register("DeformConv", since=19)
def deform_conv(
    x, w, offset, b=None, mask=None, *, dilations=None, group=1, kernel_shape=None,
    offset_group=1, pads=None, strides=None,
):
    n_batch, channels = x.shape[:2]
    n = x.dim() - 2
    kernel = list(w.shape[2:])
    strides, dilations = _or_ones(strides, n), _or_ones(dilations, n)
    pads = list(pads) if pads else [0] * (2 * n)
    out_sizes = list(offset.shape[2:])
    taps = math.prod(kernel)
    points = math.prod(out_sizes)

    # Undeformed sampling positions, (taps, points, n): window start plus dilated kernel tap.
    grids = torch.meshgrid(
        *[torch.arange(k, device=x.device) * d for k, d in zip(kernel, dilations)],
        *[torch.arange(o, device=x.device) * s - p for o, s, p in zip(out_sizes, strides, pads)],
        indexing="ij",
    )
    base = torch.stack([grids[d] + grids[n + d] for d in range(n)], dim=-1).reshape(taps, points, n)
    shifts = offset.reshape(n_batch, offset_group, taps, n, points).transpose(-1, -2)
    positions = (base.to(x.dtype) + shifts).reshape(n_batch, offset_group, taps * points, n)

    grouped = x.reshape(n_batch, offset_group, channels // offset_group, *x.shape[2:])
    samples = _bilinear_samples(grouped, positions).reshape(
        n_batch, offset_group, channels // offset_group, taps, points
    )
    if mask is not None:
        samples = samples * mask.reshape(n_batch, offset_group, 1, taps, points)
    columns = samples.reshape(n_batch, group, channels // group * taps, points)
    weights = w.reshape(group, w.shape[0] // group, -1)
    y = torch.matmul(weights, columns).reshape(n_batch, w.shape[0], *out_sizes)
    if b is not None:
        y = y + b.reshape(-1, *([1] * n))
    return y


# --- Pooling --------------------------------------------------------------------------------------


def _windows(padded: torch.Tensor, p: Pooling) -> torch.Tensor:
    """A view (N, C, *out, *kernel) of every pooling window of an already padded input."""
    for axis, (kernel, stride, dilation) in enumerate(zip(p.kernel, p.strides, p.dilations)):
        padded = padded.unfold(2 + axis, (kernel - 1) * dilation + 1, stride)[..., ::dilation]
    return padded


def _window_sums(padded: torch.Tensor, p: Pooling) -> torch.Tensor:
    # Summed over a strided view rather than by a convolution with ones, which TF32 may round.
    return _windows(padded, p).sum(dim=tuple(range(-len(p.kernel), 0)))


def _padded_for_pooling(x: torch.Tensor, p: Pooling, value: float) -> torch.Tensor:
    return _pad_spatial(x, p.begin, p.padded_end, value)


def _torch_pool_padding(x: torch.Tensor, p: Pooling) -> list[int] | None:
    """The padding for torch's pooling that gives exactly ``p``'s windows, or None.

    torch pads both ends alike, implicitly, by at most half the window: that fits when each axis
    pads its end no more than its beginning and torch's window count is ``p``'s."""
    padding = []
    for size, begin, end, kernel, dilation, stride, out in zip(
        x.shape[2:], p.begin, p.padded_end, p.kernel, p.dilations, p.strides, p.out
    ):
        span = (kernel - 1) * dilation + 1
        if end > begin or 2 * begin > span or (size + 2 * begin - span) // stride + 1 != out:
            return None
        padding.append(begin)
    return padding


def _positions(x: torch.Tensor, storage_order: int) -> torch.Tensor:
    """Each element's flat index in x, spatial axes row-major (storage_order 0) or column-major."""
    planes = math.prod(x.shape[:2])
    sizes = list(x.shape[2:])
    plane_size = math.prod(sizes)
    within = torch.arange(plane_size, device=x.device)
    within = within.reshape(sizes) if storage_order == 0 else within.reshape(sizes[::-1]).permute(
        *reversed(range(len(sizes)))
    )
    starts = torch.arange(planes, device=x.device).reshape(*x.shape[:2], *[1] * len(sizes))
    return starts * plane_size + within


@register("MaxPool", since=1)
def max_pool(
    x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None,
    storage_order=0, strides=None, _num_outputs,
):
    p = pooling(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    wants_indices = _num_outputs > 1
    if x.dtype.is_floating_point and not wants_indices:
        symmetric = _torch_pool_padding(x, p)
        if symmetric is not None:  # no padded copy of the input
            return _MAX_POOL[len(p.kernel)](x, p.kernel, p.strides, symmetric, p.dilations)
        padded = _padded_for_pooling(x, p, _lowest(x.dtype))
        return _MAX_POOL[len(p.kernel)](padded, p.kernel, p.strides, 0, p.dilations)
    padded = _padded_for_pooling(x, p, _lowest(x.dtype))
    # Integer inputs (which torch's max pooling lacks on some devices) and Indices: by windows.
    flat_windows = _windows(padded, p).flatten(2 + len(p.kernel))
    values, argmax = flat_windows.max(dim=-1)
    if not wants_indices:
        return values
    positions = _padded_for_pooling(_positions(x, storage_order), p, -1)
    indices = _windows(positions, p).flatten(2 + len(p.kernel))
    return values, torch.gather(indices, -1, argmax.unsqueeze(-1)).squeeze(-1)


@register("AveragePool", since=1)
def average_pool(
    x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
    pads=None, strides=None,
):
    p = pooling(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    sums = _window_sums(_padded_for_pooling(x, p, 0.0), p)
    # Divide by how many positions of each window count: the input's own, plus the explicit
    # padding with count_include_pad; never the room added for ceil_mode.
    counted = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    counted = _pad_spatial(counted, p.begin, p.end, float(count_include_pad))
    ceil_room = [pe - e for pe, e in zip(p.padded_end, p.end)]
    counted = _pad_spatial(counted, [0] * len(p.end), ceil_room)
    return sums / _window_sums(counted, p)


@register("LpPool", since=1)
def lp_pool(
    x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, p=2, pads=None,
    strides=None,
):
    windows = pooling(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    powered = torch.abs(x) ** p
    return _window_sums(_padded_for_pooling(powered, windows, 0.0), windows) ** (1.0 / p)


def _spatial_axes(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


@register("GlobalAveragePool", since=1)
def global_average_pool(x):
    return x.mean(dim=_spatial_axes(x), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(x):
    return x.amax(dim=_spatial_axes(x), keepdim=True)


@register("GlobalLpPool", since=1)
def global_lp_pool(x, *, p=2):
    return torch.linalg.vector_norm(x, ord=p, dim=_spatial_axes(x), keepdim=True)


@register("MaxUnpool", since=9)
def max_unpool(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    n = len(kernel_shape)
    strides = _or_ones(strides, n)
    pads = list(pads) if pads else [0] * (2 * n)
    unpooled_shape = [
        *x.shape[:2],
        *[(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[n + i] + kernel_shape[i]
          for i in range(n)],
    ]
    flat = torch.zeros(math.prod(unpooled_shape), dtype=x.dtype, device=x.device)
    y = flat.scatter(0, indices.reshape(-1), x.reshape(-1)).reshape(unpooled_shape)
    if output_shape is None:
        return y
    # As ONNX's reference does: indices address the unpooled shape, extended by zeros at the end.
    target = [int(s) for s in output_shape.tolist()]
    return _pad_spatial(y, [0] * n, [t - u for t, u in zip(target[2:], unpooled_shape[2:])])
