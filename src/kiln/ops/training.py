"""Optimizer update steps of the ``ai.onnx.preview.training`` domain: Adagrad, Adam, Momentum.

Each takes the learning rate ``R`` and step count ``T`` (scalars), then several tensors to update
at once, grouped by role: ``X1..Xn, G1..Gn, <state>1..n``. It returns the new values grouped the
same way: ``X1_new..Xn_new, <state>1_new..n``. The step count decides learning-rate adjustments
through ``torch.where`` rather than Python branches, so nothing waits on the device.
"""

from __future__ import annotations

import torch

from kiln.ops.registry import register

TRAINING_DOMAIN = "ai.onnx.preview.training"


def _groups(tensors: tuple[torch.Tensor, ...], count: int) -> list[tuple[torch.Tensor, ...]]:
    """``(X1..Xn, G1..Gn, ...)`` -> ``[(X1, G1, ...), ..., (Xn, Gn, ...)]``."""
    n = len(tensors) // count
    return list(zip(*(tensors[i * n : (i + 1) * n] for i in range(count)), strict=True))


def _by_role(updates: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Per-tensor results ``[(X1_new, S1_new), ...]`` -> ``(X1_new..Xn_new, S1_new..Sn_new)``."""
    return tuple(t for role in zip(*updates, strict=True) for t in role)


@register("Adagrad", since=1, domain=TRAINING_DOMAIN)
def adagrad(
    r: torch.Tensor,
    t: torch.Tensor,
    *tensors: torch.Tensor,
    decay_factor: float = 0.0,
    epsilon: float = 1e-6,
    norm_coefficient: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Inputs ``R, T, X.., G.., H..`` (H: accumulated squared gradients); outputs ``X.., H..``."""
    rate = r / (1 + t * decay_factor)
    updates = []
    for x, g, h in _groups(tensors, 3):
        g = norm_coefficient * x + g  # gradient of the L2 regularization term added
        h_new = h + g * g
        x_new = x - rate * g / (torch.sqrt(h_new) + epsilon)
        updates.append((x_new.to(x.dtype), h_new.to(h.dtype)))
    return _by_role(updates)


@register("Adam", since=1, domain=TRAINING_DOMAIN)
def adam(
    r: torch.Tensor,
    t: torch.Tensor,
    *tensors: torch.Tensor,
    alpha: float = 0.9,
    beta: float = 0.999,
    epsilon: float = 1e-6,
    norm_coefficient: float = 0.0,
    norm_coefficient_post: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Inputs ``R, T, X.., G.., V.., H..`` (first and second moments); outputs ``X, V, H`` new."""
    steps = t.to(r.dtype)
    # Bias correction of the moments applies from the first counted step (T > 0) on.
    corrected = r * torch.sqrt(1 - beta**steps) / (1 - alpha**steps)
    rate = torch.where(t > 0, corrected, r)
    updates = []
    for x, g, v, h in _groups(tensors, 4):
        g = norm_coefficient * x + g
        v_new = alpha * v + (1 - alpha) * g
        h_new = beta * h + (1 - beta) * g * g
        x_new = (1 - norm_coefficient_post) * (x - rate * v_new / (torch.sqrt(h_new) + epsilon))
        updates.append((x_new.to(x.dtype), v_new.to(v.dtype), h_new.to(h.dtype)))
    return _by_role(updates)


@register("Momentum", since=1, domain=TRAINING_DOMAIN)
def momentum(
    r: torch.Tensor,
    t: torch.Tensor,
    *tensors: torch.Tensor,
    alpha: float,
    beta: float,
    mode: str,
    norm_coefficient: float,
) -> tuple[torch.Tensor, ...]:
    """Inputs ``R, T, X.., G.., V..``; outputs ``X.., V..``; ``mode`` standard or nesterov."""
    gradient_scale = torch.where(t > 0, beta, 1.0)  # the first step takes the gradient whole
    updates = []
    for x, g, v in _groups(tensors, 3):
        g = norm_coefficient * x + g
        v_new = alpha * v + gradient_scale * g
        step = g + alpha * v_new if mode == "nesterov" else v_new
        updates.append(((x - r * step).to(x.dtype), v_new.to(v.dtype)))
    return _by_role(updates)
