"""``kiln::FusedConv``: a convolution with its bias, activation and residual addition in one node.

``FusedConv(X, W, B?, R?)`` takes Conv's attributes plus ``activation`` / ``activation_params``
(see :mod:`kiln.ops.activation`) and ``residual_after_activation``: 0 computes
``act(conv(X, W) + B + R)`` (ResNet's relu after the shortcut addition), 1 computes
``act(conv(X, W) + B) + R``.
"""

from __future__ import annotations

import torch

from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.conv import conv
from kiln.ops.registry import register


@register("FusedConv", domain=KILN)
def fused_conv(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, r: torch.Tensor | None = None,
    *, auto_pad: str = "NOTSET", dilations: list[int] | None = None, group: int = 1,
    kernel_shape: list[int] | None = None, pads: list[int] | None = None,
    strides: list[int] | None = None, activation: str = "",
    activation_params: list[float] | None = None, residual_after_activation: int = 0,
) -> torch.Tensor:
    y = conv(x, w, b, auto_pad=auto_pad, dilations=dilations, group=group,
             kernel_shape=kernel_shape, pads=pads, strides=strides)
    return apply_epilogue(y, r, activation, activation_params, residual_after_activation)
