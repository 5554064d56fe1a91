"""Indexing operators: gathering and scattering by index, selecting, sorting and scanning.

Negative indices count from the end of their axis wherever ONNX allows them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto

from kiln.ops.registry import register
from kiln.ops.shape import ints, is_strings, moves_strings, normalize_axis

# ONNX reduction names as torch's scatter_reduce names them.
_SCATTER_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}
_INT64_SIGN_BIT = -(2**63)


def _unsigned_order(x: torch.Tensor, onnx_type: int) -> torch.Tensor:
    """uint64 is stored as int64: flipping the sign bit makes the signed order the unsigned one.

    Flipping again restores the values.
    """
    return x ^ _INT64_SIGN_BIT if onnx_type == TensorProto.UINT64 else x


def _wrap_negative(indices: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


def _linear_index(indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Index tuples in the last dim of ``indices`` as offsets into a flattened ``shape``.

    Sizes enter as Python numbers, not tensors: nothing is copied from the host, so the op can be
    captured in a CUDA graph."""
    linear = torch.zeros(indices.shape[:-1], dtype=torch.int64, device=indices.device)
    for axis, size in enumerate(shape):
        linear = linear * size + _wrap_negative(indices[..., axis], size)
    return linear


@register("Gather", since=1)
@moves_strings
def gather(data, indices, *, axis=0):
    axis = normalize_axis(axis, data.dim())
    picked = data.index_select(axis, _wrap_negative(indices, data.shape[axis]).reshape(-1))
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])


@register("GatherElements", since=11)
@moves_strings
def gather_elements(data, indices, *, axis=0):
    return data.gather(axis, _wrap_negative(indices, data.shape[axis]))


@register("GatherND", since=11)
@moves_strings
def gather_nd(data, indices, *, batch_dims=0):
    depth = indices.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    indexed = data.shape[batch_dims:batch_dims + depth]
    rest = data.shape[batch_dims + depth:]
    # One row of indexed elements per batch entry, one index tuple per lookup.
    table = data.reshape(batch, math.prod(indexed), *rest)
    lookups_per_batch = math.prod(indices.shape[batch_dims:-1])
    lookups = _linear_index(indices, indexed).reshape(batch, lookups_per_batch)
    rows = torch.arange(batch, device=data.device)[:, None]
    return table[rows, lookups].reshape(indices.shape[:-1] + rest)


@register("Scatter", since=9)  # deprecated alias of ScatterElements
@register("ScatterElements", since=11)
@moves_strings
def scatter_elements(data, indices, updates, *, axis=0, reduction="none"):
    indices = _wrap_negative(indices, data.shape[axis])
    if reduction == "none":
        return data.scatter(axis, indices, updates)
    return data.scatter_reduce(axis, indices, updates, _SCATTER_REDUCTIONS[reduction])


@register("ScatterND", since=11)
@moves_strings
def scatter_nd(data, indices, updates, *, reduction="none"):
    depth = indices.shape[-1]
    slice_shape = data.shape[depth:]
    table = data.reshape(math.prod(data.shape[:depth]), *slice_shape).clone()
    rows = _linear_index(indices, data.shape[:depth]).reshape(-1)
    slices = updates.reshape(rows.numel(), *slice_shape)
    if reduction == "none":
        table[rows] = slices
    else:
        index = rows.reshape(-1, *[1] * len(slice_shape)).expand_as(slices)
        table.scatter_reduce_(0, index, slices, _SCATTER_REDUCTIONS[reduction])
    return table.reshape(data.shape)


@register("TensorScatter", since=24)
def tensor_scatter(past_cache, update, write_indices=None, *, axis=-2, mode="linear"):
    axis = normalize_axis(axis, past_cache.dim())
    batch, length = past_cache.shape[0], update.shape[axis]
    if write_indices is None:
        write_indices = torch.zeros(batch, dtype=torch.int64, device=past_cache.device)
    positions = write_indices.long()[:, None] + torch.arange(length, device=past_cache.device)
    if mode == "circular":
        positions = positions.remainder(past_cache.shape[axis])
    view = [1] * past_cache.dim()
    view[0], view[axis] = batch, length
    return past_cache.scatter(axis, positions.reshape(view).expand(update.shape), update)


@register("OneHot", since=9, host_inputs=(1,))
def one_hot(indices, depth, values, *, axis=-1):
    size = int(depth.item())
    rank = indices.dim() + 1
    axis = normalize_axis(axis, rank)
    classes = torch.arange(size, device=indices.device).reshape([size] + [1] * (rank - 1 - axis))
    # Indices outside [-depth, depth-1] match no class and come out all off_value.
    hot = _wrap_negative(indices, size).unsqueeze(axis) == classes
    return torch.where(hot, values[1], values[0])


@register("NonZero", since=9)
def non_zero(X):
    return torch.nonzero(X).T.contiguous()


@register("Compress", since=9)
@moves_strings
def compress(input, condition, *, axis=None):
    if axis is None:
        input, axis = input.reshape(-1), 0
    # A condition shorter than the axis keeps only among the first len(condition) slices.
    kept = torch.nonzero(condition[: input.shape[axis]]).reshape(-1)
    return input.index_select(axis, kept)


def _top_k(X, k: int, axis: int, largest: int, x_type: int):
    # A stable sort keeps equal values in index order, as ONNX requires; torch.topk does not.
    order = torch.sort(_unsigned_order(X, x_type), dim=axis, descending=bool(largest), stable=True)
    values = _unsigned_order(order.values.narrow(axis, 0, k), x_type)
    return values, order.indices.narrow(axis, 0, k)


@register("TopK", since=1)
def top_k_v1(X, *, k, axis=-1, _input_types=(0,)):
    return _top_k(X, k, axis, 1, _input_types[0])


@register("TopK", since=10, host_inputs=(1,))
def top_k(X, K, *, axis=-1, largest=1, sorted=1, _input_types=(0, 0)):
    # The order of an unsorted result is unspecified, so a sorted one is fine.
    return _top_k(X, ints(K)[0], axis, largest, _input_types[0])


@register("Unique", since=11)
def unique(X, *, axis=None, sorted=1, _input_types=(0,)):
    if is_strings(X):  # work on the strings' ranks, then look the unique ones up
        table, codes = np.unique(X.reshape(-1), return_inverse=True)
        Y, *rest = unique(torch.from_numpy(codes.reshape(X.shape)), axis=axis, sorted=sorted)
        return (table[Y.numpy().reshape(-1)].reshape(tuple(Y.shape)), *rest)
    X = _unsigned_order(X, _input_types[0])
    if axis is None:
        X, axis = X.reshape(-1), 0
    axis = normalize_axis(axis, X.dim())
    Y, inverse, counts = torch.unique(
        X, sorted=True, return_inverse=True, return_counts=True, dim=axis
    )
    positions = torch.arange(inverse.numel(), device=X.device)
    first = torch.full_like(counts, inverse.numel()).scatter_reduce(0, inverse, positions, "amin")
    if not sorted:  # order by first occurrence instead
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=X.device)
        Y, first, counts = Y.index_select(axis, order), first[order], counts[order]
        inverse = rank[inverse]
    return _unsigned_order(Y, _input_types[0]), first, inverse, counts


def _scan(x, axis, exclusive: int, reverse: int, scan, identity: int):
    axis = normalize_axis(int(axis.item()), x.dim())
    if reverse:
        x = x.flip(axis)
    out = scan(x, axis, dtype=x.dtype)  # torch would widen integers otherwise
    if exclusive and x.shape[axis]:  # shift by one, starting from the identity
        head = torch.full_like(out.narrow(axis, 0, 1), identity)
        out = torch.cat([head, out.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    return out.flip(axis) if reverse else out


@register("CumSum", since=11, host_inputs=(1,))
def cum_sum(x, axis, *, exclusive=0, reverse=0):
    return _scan(x, axis, exclusive, reverse, torch.cumsum, 0)


@register("CumProd", since=26, host_inputs=(1,))
def cum_prod(x, axis, *, exclusive=0, reverse=0):
    return _scan(x, axis, exclusive, reverse, torch.cumprod, 1)


@register("ReverseSequence", since=10)
@moves_strings
def reverse_sequence(input, sequence_lens, *, batch_axis=1, time_axis=0):
    time = torch.arange(input.shape[time_axis], device=input.device)
    lengths = sequence_lens.long().to(input.device)[:, None]
    sources = torch.where(time < lengths, lengths - 1 - time, time)  # (batch, time)
    if time_axis < batch_axis:
        sources = sources.T
    index = sources.reshape(sources.shape + (1,) * (input.dim() - 2)).expand(input.shape)
    return input.gather(time_axis, index)
