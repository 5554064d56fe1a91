"""Reductions (ReduceSum, ReduceMax, ..., ReduceLogSumExp) and ArgMax/ArgMin.

Every Reduce* op takes ``axes`` as an attribute up to one opset (ReduceSum 13, the others 18) and
as an optional int64 input from then on. An empty ``axes`` reduces over all axes, unless
``noop_with_empty_axes`` is set: then nothing is reduced, though the op's elementwise part still
applies (ReduceSumSquare squares, ReduceL2 takes absolute values), as in ONNX's reference.
Reducing an empty set gives the reduction's identity (0 for sums, 1 for products, -inf for max,
log(0) = -inf for the log-sums).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kiln.ops.registry import register


def _axes_list(axes: torch.Tensor | Sequence[int] | None) -> list[int]:
    if axes is None:
        return []
    if isinstance(axes, torch.Tensor):
        return [int(a) for a in axes.reshape(-1).tolist()]
    return list(axes)


def _resolve_axes(
    data: torch.Tensor, axes: torch.Tensor | Sequence[int] | None, noop_with_empty_axes: int
) -> tuple[int, ...]:
    """Normalized, sorted axes to reduce; () means "reduce nothing" (as for a scalar)."""
    listed = _axes_list(axes)
    if data.dim() == 0 or (not listed and noop_with_empty_axes):
        return ()
    if not listed:
        return tuple(range(data.dim()))
    return tuple(sorted({a % data.dim() for a in listed}))


def _reduced_shape(data: torch.Tensor, axes: tuple[int, ...], keepdims: int) -> list[int]:
    if keepdims:
        return [1 if i in axes else n for i, n in enumerate(data.shape)]
    return [n for i, n in enumerate(data.shape) if i not in axes]


def _sum(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    # torch widens small integer sums to int64; ONNX keeps the input type (wrapping).
    return torch.sum(x, dim=axes, keepdim=True, dtype=x.dtype)


def _prod(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    for axis in axes:  # torch.prod takes one axis at a time
        x = torch.prod(x, dim=axis, keepdim=True, dtype=x.dtype)
    return x


def _extreme(x: torch.Tensor, axes: tuple[int, ...], largest: bool) -> torch.Tensor:
    if x.numel() == 0:  # torch refuses empty max/min; ONNX gives the identity element
        return torch.full(
            _reduced_shape(x, axes, 1), _identity_of_extreme(x.dtype, largest), dtype=x.dtype,
            device=x.device,
        )
    extreme = torch.amax if largest else torch.amin
    return extreme(x, dim=axes, keepdim=True)


def _identity_of_extreme(dtype: torch.dtype, largest: bool) -> bool | int | float:
    if dtype == torch.bool:
        return not largest
    if dtype.is_floating_point:
        return -float("inf") if largest else float("inf")
    info = torch.iinfo(dtype)
    return info.min if largest else info.max


def _mean(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for axis in axes:
        count *= x.shape[axis]
    total = _sum(x, axes)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return total / count
    return torch.div(total, count, rounding_mode="trunc")


def _l2(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    # Integer inputs: ONNX computes the root in floating point and truncates back.
    wide = x if x.dtype.is_floating_point else x.to(torch.float64)
    return torch.sqrt(_sum(wide * wide, axes)).to(x.dtype)


def _log_sum_exp(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.logsumexp(x, dim=axes, keepdim=True)


_REDUCTIONS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    "ReduceSum": _sum,
    "ReduceMean": _mean,
    "ReduceProd": _prod,
    "ReduceMax": lambda x, axes: _extreme(x, axes, largest=True),
    "ReduceMin": lambda x, axes: _extreme(x, axes, largest=False),
    "ReduceL1": lambda x, axes: _sum(torch.abs(x), axes),
    "ReduceL2": _l2,
    "ReduceSumSquare": lambda x, axes: _sum(x * x, axes),
    "ReduceLogSum": lambda x, axes: torch.log(_sum(x, axes)),
    "ReduceLogSumExp": _log_sum_exp,
}

# What each op does to the elements when noop_with_empty_axes leaves nothing to reduce.
_ELEMENTWISE_PART: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ReduceL1": torch.abs,
    "ReduceL2": torch.abs,
    "ReduceSumSquare": lambda x: x * x,
    "ReduceLogSum": torch.log,
}


def _reduce(
    op: str,
    data: torch.Tensor,
    axes: torch.Tensor | Sequence[int] | None,
    keepdims: int,
    noop_with_empty_axes: int,
) -> torch.Tensor:
    resolved = _resolve_axes(data, axes, noop_with_empty_axes)
    if not resolved:
        return _ELEMENTWISE_PART.get(op, lambda x: x)(data)
    # Each reduction keeps the reduced axes; keepdims decides whether they stay.
    return _REDUCTIONS[op](data, resolved).reshape(_reduced_shape(data, resolved, keepdims))


def _register_reduce(op: str, axes_input_since: int) -> None:
    def with_axes_attribute(data, *, axes=None, keepdims=1):
        return _reduce(op, data, axes, keepdims, 0)

    def with_axes_input(data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return _reduce(op, data, axes, keepdims, noop_with_empty_axes)

    register(op, since=1)(with_axes_attribute)
    register(op, since=axes_input_since, host_inputs=(1,))(with_axes_input)


for _op in _REDUCTIONS:
    _register_reduce(_op, 13 if _op == "ReduceSum" else 18)


def _arg_extreme(
    data: torch.Tensor, axis: int, keepdims: int, select_last_index: int, largest: bool
) -> torch.Tensor:
    if data.dtype == torch.bool:  # torch has no bool argmax
        data = data.to(torch.uint8)
    axis %= data.dim()
    if select_last_index:  # torch picks the first extreme; search the reversed axis instead
        data = torch.flip(data, dims=(axis,))
    index = torch.argmax(data, dim=axis, keepdim=True) if largest else torch.argmin(
        data, dim=axis, keepdim=True
    )
    if select_last_index:
        index = data.shape[axis] - 1 - index
    return index if keepdims else index.squeeze(axis)


@register("ArgMax", since=1)
def argmax(data, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(data, axis, keepdims, select_last_index, largest=True)


@register("ArgMin", since=1)
def argmin(data, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(data, axis, keepdims, select_last_index, largest=False)
