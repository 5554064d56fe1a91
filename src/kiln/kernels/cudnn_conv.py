"""cuDNN convolution in channels-last (NHWC) layout, plain or with cuDNN's fused epilogues.

Tensor cores read NHWC; in NCHW, cuDNN transposes around every convolution. Converting the input
is a no-op once it is channels-last, and PyTorch keeps that layout through the elementwise ops
and convolutions that follow, so a conv stack converts only where it starts. Weights are
converted once, when the engine loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels.choice import (
    FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, input_ranks, with_fn,
)
from kiln.ops.activation import KILN
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

CONV_OPS = (("", "Conv"), (KILN, "FusedConv"))


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def _is_2d_conv(spec: KernelSpec, device: str) -> bool:
    ranks, dtypes = input_ranks(spec), input_dtypes(spec)
    return device == "cuda" and ranks[:2] == [4, 4] and dtypes[0] in FLOAT_TYPES


class CudnnConvChoice(Choice):
    """Convolution through cuDNN in NHWC; bias, activation and residual as PyTorch ops."""

    id = "cudnn-conv-nhwc"
    op_types = CONV_OPS
    channels_last_inputs = (0, 3)  # X and the residual

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return _is_2d_conv(spec, device)

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, w, *rest, **attributes):
            return reference.fn(channels_last(x), w, *rest, **attributes)

        return Launch(with_fn(reference, run), {1: channels_last})


class CudnnFusedConvChoice(Choice):
    """cuDNN's own fused convolution + bias (+ residual) + ReLU, in NHWC."""

    id = "cudnn-conv-nhwc-fused-relu"
    op_types = ((KILN, "FusedConv"),)
    channels_last_inputs = (0, 3)  # X and the residual

    def supports(self, spec: KernelSpec, device: str) -> bool:
        attributes = attributes_of(spec)
        has_residual = len(spec.input_types) > 3 and spec.input_types[3] is not None
        return (
            _is_2d_conv(spec, device)
            and fuses_relu(attributes, has_residual)
            and attributes.get("auto_pad", "NOTSET") == "NOTSET"
            and _symmetric(attributes.get("pads"))
        )

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        return Launch(with_fn(reference, fused_conv_relu), {1: channels_last})


def fuses_relu(attributes: Mapping[str, Any], has_residual: bool) -> bool:
    """Whether a conv's epilogue is cuDNN's fused one: + bias (+ residual), then ReLU."""
    return attributes.get("activation") == "Relu" and not (
        has_residual and attributes.get("residual_after_activation", 0)
    )


def _symmetric(pads: list[int] | None) -> bool:
    return not pads or pads[: len(pads) // 2] == pads[len(pads) // 2:]


def fused_conv_relu(
    x, w, b=None, r=None, *, dilations=None, group=1, pads=None, strides=None, **_unused,
):
    x = channels_last(x)
    stride, dilation = strides or [1, 1], dilations or [1, 1]
    padding = (pads or [0, 0, 0, 0])[:2]
    if r is None:
        return torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, group)
    return torch.cudnn_convolution_add_relu(
        x, w, channels_last(r), 1.0, b, stride, padding, dilation, group
    )
