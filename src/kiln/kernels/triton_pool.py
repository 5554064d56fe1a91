"""2-D max pooling over channels-last activations in one Triton kernel.

PyTorch's channels-last max pooling took 0.224 ms for ResNet-50's (3x3, stride 2, padding 1, over
[64, 64, 112, 112] fp16) on an H100; this kernel 0.059 ms (the input read and the output written
at 2.2 TB/s). Each program takes a block of output pixels across a block of channels (contiguous in
memory), and reads each window position's values as one masked load: positions in the padding, or
past the input in ``ceil_mode``, read ``-inf``. NaN propagates, as in PyTorch and ONNX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from kiln.kernels.choice import FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, input_ranks, with_fn
from kiln.ops.conv import pooling
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

BLOCK_PIXELS = 32
BLOCK_CHANNELS = 64


@triton.jit
def max_pool2d_kernel(
    x_ptr, out_ptr, N, H, W, C, OH, OW, KH, KW, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_pixels = pixels < N * OH * OW
    in_channels = channels < C
    ow = pixels % OW
    oh = (pixels // OW) % OH
    image = (pixels // (OW * OH)).to(tl.int64) * H
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dilation_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dilation_w
            inside = in_pixels & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offsets = ((image + ih) * W + iw) * C
            values = tl.load(x_ptr + offsets[:, None] + channels[None, :],
                             mask=inside[:, None] & in_channels[None, :], other=float("-inf"))
            best = tl.maximum(best, values.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
    out_offsets = pixels.to(tl.int64)[:, None] * C + channels[None, :]
    tl.store(out_ptr + out_offsets, best.to(out_ptr.dtype.element_ty),
             mask=in_pixels[:, None] & in_channels[None, :])


def max_pool2d(x: torch.Tensor, kernel: list[int], strides: list[int], pads: list[int],
               dilations: list[int], out_size: list[int]) -> torch.Tensor:
    """Max pooling of ``x`` [N, C, H, W] (channels-last) into [N, C, OH, OW] (channels-last);
    ``pads`` are the padding before each spatial axis (what is after follows from ``out_size``)."""
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((batch, channels, *out_size), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    pixels = batch * out_size[0] * out_size[1]
    if pixels == 0 or channels == 0:
        return out
    grid = (triton.cdiv(pixels, BLOCK_PIXELS), triton.cdiv(channels, BLOCK_CHANNELS))
    max_pool2d_kernel[grid](
        x, out, batch, height, width, channels, *out_size, *kernel, *strides, *pads, *dilations,
        BLOCK_P=BLOCK_PIXELS, BLOCK_C=BLOCK_CHANNELS, num_warps=4,
    )
    return out


class TritonMaxPoolChoice(Choice):
    """2-D MaxPool of float values (no Indices output) on the GPU."""

    id = "triton-max-pool"
    op_types = (("", "MaxPool"),)
    channels_last_inputs = (0,)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return (
            device == "cuda" and input_ranks(spec)[0] == 4 and input_dtypes(spec)[0] in FLOAT_TYPES
            and len(spec.output_types) == 1 and attributes_of(spec).get("storage_order", 0) == 0
        )

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None,
                strides=None, **_same_as_reference):
            p = pooling(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
            return max_pool2d(x, p.kernel, p.strides, p.begin, p.dilations, p.out)

        return Launch(with_fn(reference, run))
