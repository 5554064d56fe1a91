"""The activations fused layers apply, by name, and ``kiln::Activation`` that applies one alone.

Fusion passes name an activation with one of :data:`ACTIVATIONS`' keys and its parameters
(``activation_params``: LeakyRelu/Elu alpha, Clip min and max, HardSigmoid alpha and beta).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kiln.ops.registry import register

KILN = "kiln"

ACTIVATIONS: dict[str, Callable[[torch.Tensor, Sequence[float]], torch.Tensor]] = {
    "Relu": lambda x, p: torch.relu(x),
    "LeakyRelu": lambda x, p: F.leaky_relu(x, p[0] if p else 0.01),
    "Elu": lambda x, p: F.elu(x, p[0] if p else 1.0),
    "Clip": lambda x, p: torch.clamp(x, p[0], p[1]),
    "Sigmoid": lambda x, p: torch.sigmoid(x),
    "HardSigmoid": lambda x, p: torch.clamp(x * (p[0] if p else 0.2) + (p[1] if p else 0.5), 0, 1),
    "Tanh": lambda x, p: torch.tanh(x),
    "Silu": lambda x, p: F.silu(x),
    "HardSwish": lambda x, p: F.hardswish(x),
    "Gelu": lambda x, p: F.gelu(x),
    "GeluTanh": lambda x, p: F.gelu(x, approximate="tanh"),
    "Mish": lambda x, p: F.mish(x),
    "Softplus": lambda x, p: F.softplus(x),
}


def apply_activation(x: torch.Tensor, activation: str, params: Sequence[float] | None) -> torch.Tensor:
    if not activation:
        return x
    return ACTIVATIONS[activation](x, params or ())


def apply_epilogue(
    y: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str,
    params: Sequence[float] | None,
    residual_after_activation: int,
) -> torch.Tensor:
    """A fused layer's epilogue: ``act(y + r)``, or ``act(y) + r`` when the residual comes after."""
    if residual is not None and not residual_after_activation:
        y = y + residual
    y = apply_activation(y, activation, params)
    if residual is not None and residual_after_activation:
        y = y + residual
    return y


@register("Activation", domain=KILN)
def activation(x: torch.Tensor, *, activation: str, activation_params: list[float] | None = None):
    return apply_activation(x, activation, activation_params)


# Constants fusion rules compare against when recognising decomposed activations.
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715
