"""Softmax-like ops, normalizations (batch, layer, RMS, group, instance, LRN, Lp, MVN) and Dropout.

Softmax, LogSoftmax and Hardmax before opset 13 coerce the input to 2-D at ``axis`` and normalize
over the whole flattened trailing block; from 13 on they work along the single ``axis``.
The statistics of LayerNormalization/RMSNormalization/GroupNormalization are computed in the
``stash_type`` precision (or the input's, when that is wider).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register

# --- Softmax family -------------------------------------------------------------------------------


def _hardmax_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    # One-hot of the first maximum, as ONNX's reference (argmax) picks it.
    first_max = torch.argmax(x, dim=dim, keepdim=True)
    return torch.zeros_like(x).scatter_(dim, first_max, 1)


_ALONG_AXIS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "Softmax": lambda x, dim: torch.softmax(x, dim=dim),
    "LogSoftmax": lambda x, dim: torch.log_softmax(x, dim=dim),
    "Hardmax": _hardmax_along,
}


def _register_softmax_like(op: str) -> None:
    along_axis = _ALONG_AXIS[op]

    def flattened_at_axis(x, *, axis=1):
        if x.numel() == 0:
            return x
        axis %= max(x.dim(), 1)
        rows = math.prod(x.shape[:axis])
        return along_axis(x.reshape(rows, -1), 1).reshape(x.shape)

    def single_axis(x, *, axis=-1):
        if x.numel() == 0:
            return x
        return along_axis(x, axis)

    register(op, since=1)(flattened_at_axis)
    register(op, since=13)(single_axis)


for _op in _ALONG_AXIS:
    _register_softmax_like(_op)


# --- Batch and instance normalization -------------------------------------------------------------


def _per_channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast against (N, C, D1, ...)."""
    if param.dim() == 1:
        return param.reshape(-1, *([1] * (x.dim() - 2)))
    return param  # BatchNormalization with spatial=0: already shaped (C, D1, ...)


def _batch_norm_inference(x, scale, bias, mean, var, epsilon):
    inv_std = torch.rsqrt(_per_channel(var, x) + epsilon)
    return ((x - _per_channel(mean, x)) * inv_std * _per_channel(scale, x)
            + _per_channel(bias, x)).to(x.dtype)


def _batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    axes = [0, *range(2, x.dim())]
    return x.mean(dim=axes), x.var(dim=axes, unbiased=False)


def _batch_norm_training(x, scale, bias, mean, var, epsilon, momentum):
    """Y normalized by the batch's statistics, running statistics, and the batch's statistics."""
    batch_mean, batch_var = _batch_statistics(x)
    y = _batch_norm_inference(x, scale, bias, batch_mean, batch_var, epsilon)
    running_mean = (mean * momentum + batch_mean * (1 - momentum)).to(x.dtype)
    running_var = (var * momentum + batch_var * (1 - momentum)).to(x.dtype)
    return y, running_mean, running_var, batch_mean.to(x.dtype), batch_var.to(x.dtype)


@register("BatchNormalization", since=1)
def batch_normalization_legacy(
    x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, spatial=1, is_test=0,
    consumed_inputs=None, _num_outputs,
):
    # Before opset 14 the node is in training mode exactly when it asks for the statistics.
    if _num_outputs > 1:
        return _batch_norm_training(x, scale, bias, mean, var, epsilon, momentum)
    return _batch_norm_inference(x, scale, bias, mean, var, epsilon)


@register("BatchNormalization", since=14)
def batch_normalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
    if training_mode:
        return _batch_norm_training(x, scale, bias, mean, var, epsilon, momentum)[:3]
    return _batch_norm_inference(x, scale, bias, mean, var, epsilon)


@register("InstanceNormalization", since=1)
def instance_normalization(x, scale, bias, *, epsilon=1e-5, consumed_inputs=None):
    axes = list(range(2, x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    var = x.var(dim=axes, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + epsilon) * _per_channel(scale, x) + _per_channel(bias, x)


# --- Layer, RMS and group normalization -----------------------------------------------------------


def _stash_dtype(x: torch.Tensor, stash_type: int) -> torch.dtype:
    return torch.promote_types(x.dtype, torch_dtype(stash_type))


@register("LayerNormalization", since=17)
def layer_normalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    stash = _stash_dtype(x, stash_type)
    axes = list(range(axis % x.dim(), x.dim()))
    wide = x.to(stash)
    mean = wide.mean(dim=axes, keepdim=True)
    centered = wide - mean
    inv_std_dev = torch.rsqrt((centered * centered).mean(dim=axes, keepdim=True) + epsilon)
    y = (centered * inv_std_dev).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    stats_dtype = torch_dtype(stash_type)
    return y, mean.to(stats_dtype), inv_std_dev.to(stats_dtype)


@register("RMSNormalization", since=23)
def rms_normalization(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    wide = x.to(_stash_dtype(x, stash_type))
    axes = list(range(axis % x.dim(), x.dim()))
    inv_rms = torch.rsqrt((wide * wide).mean(dim=axes, keepdim=True) + epsilon)
    return (wide * inv_rms).to(x.dtype) * scale


def _group_normalized(x: torch.Tensor, num_groups: int, epsilon: float, stash: torch.dtype):
    """x standardized per instance and group of channels, in x's shape and dtype."""
    grouped = x.to(stash).reshape(x.shape[0], num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=False, keepdim=True)
    return ((grouped - mean) * torch.rsqrt(var + epsilon)).reshape(x.shape).to(x.dtype)


@register("GroupNormalization", since=18)
def group_normalization_per_group(x, scale, bias, *, num_groups, epsilon=1e-5):
    # scale and bias hold one value per group: repeat it for the group's channels.
    channels_per_group = x.shape[1] // num_groups
    scale = scale.repeat_interleave(channels_per_group)
    bias = bias.repeat_interleave(channels_per_group)
    normalized = _group_normalized(x, num_groups, epsilon, x.dtype)
    return normalized * _per_channel(scale, x) + _per_channel(bias, x)


@register("GroupNormalization", since=21)
def group_normalization(x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    normalized = _group_normalized(x, num_groups, epsilon, _stash_dtype(x, stash_type))
    return normalized * _per_channel(scale, x) + _per_channel(bias, x)


# --- Other normalizations -------------------------------------------------------------------------


@register("LRN", since=1)
def lrn(x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    # Sum of squares over a window of channels: floor((size-1)/2) before, ceil((size-1)/2) after.
    before = (size - 1) // 2
    squares = (x * x).movedim(1, -1)
    padded = torch.nn.functional.pad(squares, (before, size - 1 - before))
    square_sum = padded.unfold(-1, size, 1).sum(dim=-1).movedim(-1, 1)
    return x / (bias + (alpha / size) * square_sum) ** beta


@register("LpNormalization", since=1)
def lp_normalization(x, *, axis=-1, p=2):
    norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
    # A zero norm gives zeros, not NaN.
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


@register("MeanVarianceNormalization", since=9)
def mean_variance_normalization(x, *, axes=(0, 2, 3)):
    axes = list(axes)
    mean = x.mean(dim=axes, keepdim=True)
    variance = (x * x).mean(dim=axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(variance) + 1e-9)


# --- Dropout --------------------------------------------------------------------------------------


def _keep_mask(x: torch.Tensor, ratio: float, seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.rand(x.shape, device=x.device) >= ratio
    # A seeded node draws from NumPy's generator, as ONNX's reference does, so that its outputs
    # are reproducible and match other runtimes following the reference.
    drawn = np.random.RandomState(seed).uniform(0.0, 1.0, tuple(x.shape)) >= ratio
    return torch.from_numpy(drawn).to(x.device)


def _dropout(x, ratio: float, training: bool, seed: int | None):
    """(output, keep mask)."""
    if not training or ratio == 0:
        return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
    keep = _keep_mask(x, ratio, seed)
    return (x * keep * (1.0 / (1.0 - ratio))).to(x.dtype), keep


@register("Dropout", since=1)
def dropout_legacy(x, *, ratio=0.5, is_test=0, consumed_inputs=None):
    # Inference: identity. The mask output of these versions has x's type.
    return x, torch.ones_like(x)


@register("Dropout", since=10)
def dropout_with_bool_mask(x, *, ratio=0.5):
    return _dropout(x, ratio, training=False, seed=None)


@register("Dropout", since=12)
def dropout(x, ratio=None, training_mode=None, *, seed=None):
    ratio_value = 0.5 if ratio is None else float(ratio)
    training = training_mode is not None and bool(training_mode)
    return _dropout(x, ratio_value, training, seed)
