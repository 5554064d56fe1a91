"""A convolution whose stride equals its kernel (a vision transformer's patch embedding) as one GEMM.

Such windows do not overlap and pad nothing, so the convolution is a reshape of the input into
patches, [batch * patches, channels * kernel area], times the weight as [channels * kernel area,
out channels]. cuDNN runs ViT-B/16's embedding (3 input channels, 16x16 windows) in channels-last
about twenty times slower than that GEMM on an H100: three channels fill no tensor-core tile.
The output comes back channels-last, [batch, out, h, w] over [batch, h, w, out] memory: the GEMM's
own layout, and the one a transformer's flatten to [batch, h * w, out] reads without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels.choice import FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, with_fn
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec


def is_patch_conv(attributes: Mapping[str, Any], weight_shape: Sequence[Any] | None) -> bool:
    """Whether a 2-D Conv with these attributes and weight shape has stride = kernel, no padding,
    no dilation and one group."""
    if weight_shape is None or len(weight_shape) != 4 or not all(isinstance(d, int) for d in weight_shape):
        return False
    kernel = list(weight_shape[2:])
    return (
        attributes.get("group", 1) == 1
        and list(attributes.get("kernel_shape", kernel)) == kernel
        and list(attributes.get("strides", [1, 1])) == kernel
        and set(attributes.get("dilations", [1, 1])) == {1}
        and not any(attributes.get("pads", [0] * 4))
        and attributes.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    )


def patches_times(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  kernel: Sequence[int]) -> torch.Tensor:
    """The patch convolution of ``x`` [n, c, h, w] by ``weight`` laid out [c * kh * kw, out]."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = h // kh, w // kw
    # Windows that would run past the edge are not part of the convolution's output.
    x = x[:, :, : oh * kh, : ow * kw]
    patches = x.reshape(n, c, oh, kh, ow, kw).permute(0, 2, 4, 1, 3, 5).reshape(n * oh * ow, c * kh * kw)
    out = patches @ weight if bias is None else torch.addmm(bias, patches, weight)
    return out.reshape(n, oh, ow, weight.shape[1]).permute(0, 3, 1, 2)


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).t().contiguous()


class PatchGemmChoice(Choice):
    id = "patch-gemm"
    op_types = (("", "Conv"),)
    timed_only = True  # faster only where cuDNN's kernels fit the channels badly

    def supports(self, spec: KernelSpec, device: str) -> bool:
        weight = spec.input_types[1] if len(spec.input_types) > 1 else None
        return (device == "cuda" and input_dtypes(spec)[0] in FLOAT_TYPES
                and is_patch_conv(attributes_of(spec), None if weight is None else weight.shape))

    def recipe(self, spec: KernelSpec) -> dict[str, Any]:
        return {"choice": self.id, "kernel": list(spec.input_types[1].shape[2:])}

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        kernel = list(recipe["kernel"])

        def run(x, w, b=None, **attributes):
            return patches_times(x, w, b, kernel)

        return Launch(with_fn(reference, run), {1: _gemm_weight})
