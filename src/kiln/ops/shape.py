"""Shape operators: reading shapes, reshaping, rearranging, joining, cutting and padding tensors.

Shape-like inputs (a target shape, slice bounds, pads) are read to the host with ``.tolist()``: they
decide the output shape, so they are needed there anyway. Ops that only move elements around also
take string tensors (NumPy object arrays) through :func:`moves_strings`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiln.errors import UnsupportedOpError
from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register

# --- helpers shared with indexing.py and sequence.py -------------------------------------------


def ints(values: torch.Tensor | None) -> list[int] | None:
    """A 1-D (or scalar) tensor of integers as a Python list; ``None`` stays ``None``."""
    return None if values is None else [int(v) for v in values.reshape(-1).tolist()]


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def is_strings(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == object


def _holds_strings(value: Any) -> bool:
    return is_strings(value) or (isinstance(value, list) and any(map(is_strings, value)))


def moves_strings(op: Callable[..., Any]) -> Callable[..., Any]:
    """Let an op that only moves elements around take string tensors (NumPy object arrays).

    torch has no string type, so every string input (or string tensor in a sequence input) is
    replaced by a tensor of its elements' positions in one pool; the op moves the positions, and
    the positions it returns are looked up in the pool.
    """

    @functools.wraps(op)
    def run(*inputs: Any, **attributes: Any) -> Any:
        if not any(map(_holds_strings, inputs)):
            return op(*inputs, **attributes)
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), "cpu")
        pool: list[np.ndarray] = []
        pooled = 0

        def to_positions(value: Any) -> Any:
            nonlocal pooled
            if isinstance(value, list):
                return [to_positions(v) for v in value]
            if not is_strings(value):
                return value
            pool.append(value.reshape(-1))
            pooled += value.size
            return torch.arange(pooled - value.size, pooled, device=device).reshape(value.shape)

        result = op(*(to_positions(x) for x in inputs), **attributes)
        strings = np.concatenate(pool)

        def to_strings(value: Any) -> Any:
            if isinstance(value, (tuple, list)):
                return type(value)(to_strings(v) for v in value)
            return strings[value.cpu().numpy().reshape(-1)].reshape(tuple(value.shape))

        return to_strings(result)

    return run


def pad_axis(
    data: torch.Tensor, axis: int, before: int, after: int, mode: str, value: Any = 0
) -> torch.Tensor:
    """Pad (or, for negative amounts, crop) one axis; ``value`` is a scalar or 0-d tensor."""
    size = data.shape[axis]
    data = data.narrow(axis, max(-before, 0), size - max(-before, 0) - max(-after, 0))
    before, after = max(before, 0), max(after, 0)
    if before == after == 0:
        return data
    size = data.shape[axis]
    if mode == "constant":
        shape = list(data.shape)
        shape[axis] += before + after
        fill = (
            value.to(data.device, data.dtype).reshape(()) if isinstance(value, torch.Tensor)
            else torch.full((), value, dtype=data.dtype, device=data.device)
        )
        out = fill.expand(shape).clone()
        out.narrow(axis, before, size).copy_(data)
        return out
    # The other modes copy existing elements: pick, for every output position, its source.
    positions = torch.arange(-before, size + after, device=data.device)
    if mode == "edge":
        sources = positions.clamp(0, size - 1)
    elif mode == "wrap":
        sources = positions.remainder(size)
    elif mode == "reflect":
        period = 2 * (size - 1)  # reflecting without repeating the edge repeats every period
        sources = positions.abs().remainder(max(period, 1))
        sources = torch.where(sources >= size, period - sources, sources)
    else:
        raise UnsupportedOpError(
            f"Pad: unknown mode {mode!r} (expected constant, reflect, edge or wrap)"
        )
    return data.index_select(axis, sources)


# --- shapes ------------------------------------------------------------------------------------


@register("Shape", since=1, metadata_only=True)
def shape(data, *, start=0, end=None, _device):
    # Python slicing counts negative axes from the back and clamps exactly as ONNX does.
    return torch.tensor(list(data.shape)[start:end], dtype=torch.int64, device=_device)


@register("Size", since=1, metadata_only=True)
def size(data, *, _device):
    return torch.tensor(math.prod(data.shape), dtype=torch.int64, device=_device)


def _reshape(data, shape: list[int], allowzero: int):
    if not allowzero:  # 0 copies the input's dimension
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


@register("Reshape", since=1)
@moves_strings
def reshape_v1(data, *, shape, consumed_inputs=None):
    return _reshape(data, shape, allowzero=0)


@register("Reshape", since=5, host_inputs=(1,))
@moves_strings
def reshape(data, shape, *, allowzero=0):
    return _reshape(data, ints(shape), allowzero)


@register("Flatten", since=1)
@moves_strings
def flatten(input, *, axis=1):
    axis = normalize_axis(axis, input.dim())
    return input.reshape(math.prod(input.shape[:axis]), math.prod(input.shape[axis:]))


def _squeeze(data, axes: list[int] | None):
    if axes is None:
        axes = [i for i, d in enumerate(data.shape) if d == 1]
    dropped = {normalize_axis(a, data.dim()) for a in axes}
    return data.reshape([d for i, d in enumerate(data.shape) if i not in dropped])


@register("Squeeze", since=1)
@moves_strings
def squeeze_v1(data, *, axes=None):
    return _squeeze(data, axes)


@register("Squeeze", since=13, host_inputs=(1,))
@moves_strings
def squeeze(data, axes=None):
    return _squeeze(data, ints(axes))


def _unsqueeze(data, axes: list[int]):
    rank = data.dim() + len(axes)  # axes count in the output's rank
    inserted = {normalize_axis(a, rank) for a in axes}
    dims = iter(data.shape)
    return data.reshape([1 if i in inserted else next(dims) for i in range(rank)])


@register("Unsqueeze", since=1)
@moves_strings
def unsqueeze_v1(data, *, axes):
    return _unsqueeze(data, axes)


@register("Unsqueeze", since=13, host_inputs=(1,))
@moves_strings
def unsqueeze(data, axes):
    return _unsqueeze(data, ints(axes))


@register("Transpose", since=1)
@moves_strings
def transpose(data, *, perm=None):
    return data.permute(perm if perm is not None else list(reversed(range(data.dim()))))


@register("Expand", since=8, host_inputs=(1,))
@moves_strings
def expand(input, shape):
    # Broadcasting goes both ways: a 1 in `shape` keeps the input's dimension.
    return input.expand(torch.broadcast_shapes(input.shape, tuple(ints(shape))))


@register("Tile", since=1)
@moves_strings
def tile_v1(input, tiles, axis):
    repeats = [1] * input.dim()
    repeats[normalize_axis(int(axis), input.dim())] = int(tiles)
    return input.repeat(repeats)


@register("Tile", since=6, host_inputs=(1,))
@moves_strings
def tile(input, repeats):
    return input.repeat(ints(repeats))


# --- joining and cutting ---------------------------------------------------------------------


@register("Concat", since=1)
@moves_strings
def concat(*inputs, axis=1):  # Concat-1 defaults to axis 1; later versions require the attribute
    return torch.cat(inputs, dim=axis)


def _even_parts(size: int, count: int) -> list[int]:
    """``count`` parts of ``ceil(size / count)``, the last one smaller when it does not divide."""
    part = -(-size // count)
    return [min(part, max(size - i * part, 0)) for i in range(count)]


def _split(input, sizes: Sequence[int] | None, axis: int, count: int):
    if sizes is None:
        sizes = _even_parts(input.shape[axis], count)
    return tuple(torch.split(input, list(sizes), dim=axis))


@register("Split", since=1)
@moves_strings
def split_v1(input, split_input=None, *, axis=0, split=None, _num_outputs):
    # Split-1 takes the sizes as attribute or input; Split-2 and -11 only as attribute.
    return _split(input, split if split is not None else ints(split_input), axis, _num_outputs)


@register("Split", since=13, host_inputs=(1,))
@moves_strings
def split(input, split=None, *, axis=0, num_outputs=None, _num_outputs):
    return _split(input, ints(split), axis, num_outputs or _num_outputs)


def _slice(
    data,
    starts: list[int],
    ends: list[int],
    axes: list[int] | None,
    steps: list[int] | None,
):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, data.dim())
        # range() normalizes and clamps the bounds exactly as ONNX does (INT64 extremes included).
        kept = range(data.shape[axis])[start:end:step]
        if step > 0:
            index = (slice(None),) * axis + (slice(kept.start, kept.stop, step),)
            data = data[index]
        else:  # torch slicing has no negative steps
            picked = kept.start + kept.step * torch.arange(len(kept), device=data.device)
            data = data.index_select(axis, picked)
    return data


@register("Slice", since=1)
@moves_strings
def slice_v1(data, *, starts, ends, axes=None):
    return _slice(data, starts, ends, axes, None)


@register("Slice", since=10, host_inputs=(1, 2, 3, 4))
@moves_strings
def slice_(data, starts, ends, axes=None, steps=None):
    return _slice(data, ints(starts), ints(ends), ints(axes), ints(steps))


def _pad(data, pads: list[int], mode: str, value: Any, axes: list[int] | None):
    axes = range(data.dim()) if axes is None else [normalize_axis(a, data.dim()) for a in axes]
    count = len(axes)  # pads holds every axis' start amount, then every axis' end amount
    for i, axis in enumerate(axes):
        data = pad_axis(data, axis, pads[i], pads[count + i], mode, value)
    return data


@register("Pad", since=1)
def pad_v1(data, *, paddings, mode="constant", value=0.0):
    return _pad(data, paddings, mode, value, None)


@register("Pad", since=2)
def pad_v2(data, *, pads, mode="constant", value=0.0):
    return _pad(data, pads, mode, value, None)


@register("Pad", since=11, host_inputs=(1, 2, 3))
def pad(data, pads, constant_value=None, axes=None, *, mode="constant"):
    if constant_value is None:
        value = 0
    elif constant_value.device.type == "cpu":  # read where it is: no copy to the device
        value = constant_value.reshape(()).item()
    else:
        value = constant_value
    return _pad(data, ints(pads), mode, value, ints(axes))


@register("CenterCropPad", since=18, host_inputs=(1,))
def center_crop_pad(input_data, shape, *, axes=None):
    rank = input_data.dim()
    axes = range(rank) if axes is None else [normalize_axis(a, rank) for a in axes]
    out = input_data
    for axis, target in zip(axes, ints(shape)):
        size = out.shape[axis]
        if target < size:  # the window starts half a pixel left of centre when odd
            out = out.narrow(axis, (size - target) // 2, target)
        elif target > size:  # the odd pixel of padding goes to the end
            before = (target - size) // 2
            out = pad_axis(out, axis, before, target - size - before, "constant")
    return out


# --- values ----------------------------------------------------------------------------------


@register("Identity", since=1)
def identity(input):
    return input  # tensors, sequences and optionals alike


@register("Constant", since=1)
def constant(
    *,
    value=None,
    sparse_value=None,
    value_float=None,
    value_floats=None,
    value_int=None,
    value_ints=None,
    value_string=None,
    value_strings=None,
    _device,
):
    if value is not None:
        return value
    if sparse_value is not None:
        raise UnsupportedOpError(
            "Constant with a sparse_value is not supported by kiln; store the value densely"
        )
    for number, dtype in ((value_float, torch.float32), (value_floats, torch.float32),
                          (value_int, torch.int64), (value_ints, torch.int64)):
        if number is not None:
            return torch.tensor(number, dtype=dtype, device=_device)
    text = value_string if value_string is not None else value_strings
    return np.array(text, dtype=object)


@register("ConstantOfShape", since=9, host_inputs=(0,))
def constant_of_shape(input, *, value=None, _device):
    shape = ints(input)
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=_device)
    return value.reshape(()).expand(shape).clone()


@register("Range", since=11, host_inputs=(0, 1, 2))
def range_(start, limit, delta, *, stash_type=1, _device):
    # Range-11..26 have no stash_type: computing half types in float32 is at least as accurate.
    dtype = start.dtype
    first, stop, step = start.item(), limit.item(), delta.item()
    if dtype.is_floating_point:
        count = max(math.ceil((stop - first) / step), 0)
    else:
        count = max(-((first - stop) // step), 0)  # exact ceil division for integers
    compute = dtype
    if dtype in (torch.float16, torch.bfloat16):
        compute = torch.float64 if stash_type == 11 else torch.float32
    values = torch.arange(count, dtype=compute, device=_device) * step + first
    return values.to(dtype)


@register("EyeLike", since=9)
def eye_like(input, *, dtype=None, k=0):
    rows, cols = input.shape
    columns = torch.arange(cols, device=input.device)
    on_diagonal = columns - torch.arange(rows, device=input.device)[:, None] == k
    return on_diagonal.to(input.dtype if dtype is None else torch_dtype(dtype))


@register("Trilu", since=14, host_inputs=(1,))
def trilu(input, k=None, *, upper=1):
    diagonal = 0 if k is None else int(k.item())
    return torch.triu(input, diagonal) if upper else torch.tril(input, diagonal)


# --- space and depth ---------------------------------------------------------------------------


@register("DepthToSpace", since=1)
@moves_strings
def depth_to_space(input, *, blocksize, mode="DCR"):
    b, c, h, w = input.shape
    depth = c // blocksize**2
    if mode == "DCR":  # depth, column, row
        blocks = input.reshape(b, blocksize, blocksize, depth, h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD: column, row, depth
        blocks = input.reshape(b, depth, blocksize, blocksize, h, w).permute(0, 1, 4, 2, 5, 3)
    return blocks.reshape(b, depth, h * blocksize, w * blocksize)


@register("SpaceToDepth", since=1)
@moves_strings
def space_to_depth(input, *, blocksize, mode="DCR"):
    b, c, h, w = input.shape
    tiles = input.reshape(b, c, h // blocksize, blocksize, w // blocksize, blocksize)
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    return tiles.permute(order).reshape(b, c * blocksize**2, h // blocksize, w // blocksize)


@register("Col2Im", since=18, host_inputs=(1, 2))
def col2im(input, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    image, block = ints(image_shape), ints(block_shape)
    n = len(image)
    dilations = dilations or [1] * n
    strides = strides or [1] * n
    pads = pads or [0] * (2 * n)
    device = input.device
    # The image coordinate of every (kernel offset, block position) pair, as one linear index;
    # dims are laid out as (kernel_0, ..., kernel_n-1, block_0, ..., block_n-1).
    linear = torch.zeros((), dtype=torch.int64, device=device)
    inside = torch.ones((), dtype=torch.bool, device=device)
    for i in range(n):
        span = dilations[i] * (block[i] - 1) + 1
        positions = (image[i] + pads[i] + pads[n + i] - span) // strides[i] + 1
        offsets = torch.arange(block[i], device=device) * dilations[i]
        starts = torch.arange(positions, device=device) * strides[i] - pads[i]
        coordinate = offsets[:, None] + starts[None, :]
        view = [1] * (2 * n)
        view[i], view[n + i] = block[i], positions
        coordinate = coordinate.reshape(view)
        linear = linear * image[i] + coordinate
        inside = inside & (coordinate >= 0) & (coordinate < image[i])
    inside = inside.expand(linear.shape).reshape(-1)
    linear = linear.reshape(-1)[inside]
    batch, columns = input.shape[:2]
    channels = columns // math.prod(block)
    values = input.reshape(batch, channels, -1)[:, :, inside]
    out = input.new_zeros(batch, channels, math.prod(image))
    out.index_add_(2, linear, values)
    return out.reshape(batch, channels, *image)
