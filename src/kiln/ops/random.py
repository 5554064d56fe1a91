"""Random generators: normal and uniform samples, Bernoulli draws and multinomial sampling.

A ``seed`` attribute seeds a fresh ``torch.Generator`` on the execution device, so a seeded node
gives the same values on every run (on a given device; torch's CPU and CUDA streams differ, and
neither matches other runtimes, which ONNX allows). Without a seed, torch's global generator is
used. Samples are drawn in float32 (float64 for double outputs) and then cast, since not every
device has half-precision samplers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register


def _generator(seed: float | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _sample_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normal(shape, dtype, mean, scale, seed, device) -> torch.Tensor:
    sample = torch.randn(
        tuple(shape), generator=_generator(seed, device), dtype=_sample_dtype(dtype), device=device
    )
    return (sample * scale + mean).to(dtype)


def _uniform(shape, dtype, low, high, seed, device) -> torch.Tensor:
    sample = torch.rand(
        tuple(shape), generator=_generator(seed, device), dtype=_sample_dtype(dtype), device=device
    )
    return (sample * (high - low) + low).to(dtype)


def _like(input: torch.Tensor | np.ndarray, dtype: int | None, device) -> tuple:
    """Shape, element type and device of a ``*Like`` op's output (strings live on the host)."""
    if isinstance(input, np.ndarray):  # a string input: valid models name the output dtype
        return input.shape, torch_dtype(dtype), device
    out_dtype = input.dtype if dtype is None else torch_dtype(dtype)
    return input.shape, out_dtype, input.device


@register("RandomNormal", since=1)
def random_normal(
    *,
    shape: Sequence[int],
    dtype: int = 1,
    mean: float = 0.0,
    scale: float = 1.0,
    seed: float | None = None,
    _device,
) -> torch.Tensor:
    return _normal(shape, torch_dtype(dtype), mean, scale, seed, _device)


@register("RandomUniform", since=1)
def random_uniform(
    *,
    shape: Sequence[int],
    dtype: int = 1,
    low: float = 0.0,
    high: float = 1.0,
    seed: float | None = None,
    _device,
) -> torch.Tensor:
    return _uniform(shape, torch_dtype(dtype), low, high, seed, _device)


@register("RandomNormalLike", since=1)
def random_normal_like(
    input: torch.Tensor | np.ndarray,
    *,
    dtype: int | None = None,
    mean: float = 0.0,
    scale: float = 1.0,
    seed: float | None = None,
    _device,
) -> torch.Tensor:
    shape, out_dtype, device = _like(input, dtype, _device)
    return _normal(shape, out_dtype, mean, scale, seed, device)


@register("RandomUniformLike", since=1)
def random_uniform_like(
    input: torch.Tensor | np.ndarray,
    *,
    dtype: int | None = None,
    low: float = 0.0,
    high: float = 1.0,
    seed: float | None = None,
    _device,
) -> torch.Tensor:
    shape, out_dtype, device = _like(input, dtype, _device)
    return _uniform(shape, out_dtype, low, high, seed, device)


@register("Bernoulli", since=15)
def bernoulli(
    input: torch.Tensor, *, dtype: int | None = None, seed: float | None = None
) -> torch.Tensor:
    """Each output element is 1 with the probability given by the matching input element."""
    out_dtype = input.dtype if dtype is None else torch_dtype(dtype)
    probabilities = input.to(_sample_dtype(input.dtype))
    draws = torch.bernoulli(probabilities, generator=_generator(seed, input.device))
    return draws.to(out_dtype)


@register("Multinomial", since=7)
def multinomial(
    input: torch.Tensor, *, dtype: int = 6, sample_size: int = 1, seed: float | None = None
) -> torch.Tensor:
    """``sample_size`` class indices per row of unnormalized log-probabilities ``[batch, C]``."""
    probabilities = torch.softmax(input.to(_sample_dtype(input.dtype)), dim=-1)
    samples = torch.multinomial(
        probabilities, sample_size, replacement=True, generator=_generator(seed, input.device)
    )
    return samples.to(torch_dtype(dtype))
