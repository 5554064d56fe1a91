"""Strided narrow convolutions as stride-1 convolutions over space-to-depth input, against the
``ops`` convolution. On the CPU the folding kernel runs in Triton's interpreter; on a GPU compiled,
with cuDNN's fused ReLU."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.arithmetic import strict_fp32
from kiln.kernels.catalog import BY_ID
from kiln.lowering.spec import KernelSpec, ValueType
from kiln.ops.registry import lookup

CHOICE = "space-to-depth-conv"
DEVICES = [pytest.param("cpu", marks=pytest.mark.triton_interpreter),
           pytest.param("cuda", marks=pytest.mark.gpu)]


def _spec(x_shape, w_shape, attributes, op="Conv", domain=""):
    encoded = {name: {"ints" if isinstance(v, list) else "int": v} for name, v in attributes.items()}
    return KernelSpec.create(op, domain, 17 if not domain else 1, encoded,
                             (ValueType("tensor", 16, x_shape), ValueType("tensor", 16, w_shape)),
                             (ValueType("tensor", 16, None),))


@pytest.mark.parametrize("x_shape, w_shape, attributes, expected", [
    ((64, 3, 224, 224), (64, 3, 7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, True),  # ResNet's stem
    ((8, 4, 32, 32), (16, 4, 4, 4), {"strides": [4, 4]}, True),                  # 64 folded channels
    ((8, 5, 32, 32), (16, 5, 4, 4), {"strides": [4, 4]}, False),                 # 80: wide enough
    ((8, 3, 32, 32), (16, 3, 3, 3), {"strides": [1, 1]}, False),
    ((8, 3, 32, 32), (16, 3, 3, 3), {"strides": [2, 1]}, False),
    ((8, 3, 32, 32), (16, 3, 1, 1), {"strides": [2, 2]}, False),                 # window < stride
    ((8, 3, 32, 32), (16, 3, 3, 3), {"strides": [2, 2], "dilations": [2, 2]}, False),
    ((8, 4, 32, 32), (16, 2, 3, 3), {"strides": [2, 2], "group": 2}, False),
    (("n", 3, 32, 32), (16, 3, 3, 3), {"strides": [2, 2]}, False),               # symbolic batch
])
def test_which_convolutions_fold(x_shape, w_shape, attributes, expected):
    assert BY_ID[CHOICE].supports(_spec(x_shape, w_shape, attributes), "cuda") is expected
    assert not BY_ID[CHOICE].supports(_spec(x_shape, w_shape, attributes), "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, kernel, stride, attributes", [
    ((30, 30), (7, 7), 2, {"pads": [3, 3, 3, 3]}),                     # ResNet's stem, smaller
    ((31, 26), (7, 5), 2, {"pads": [3, 1, 2, 0]}),                     # odd sizes, uneven padding
    ((29, 33), (5, 6), 3, {"auto_pad": "SAME_UPPER"}),
    ((16, 16), (4, 4), 4, {}),                                         # windows that do not overlap
])
def test_folded_convolution_matches_the_convolution(device, size, kernel, stride, attributes):
    generator = torch.Generator().manual_seed(sum(size) + stride)
    x = torch.randn(2, 3, *size, generator=generator).to(device)
    w = torch.randn(12, 3, *kernel, generator=generator).to(device)
    b = torch.randn(12, generator=generator).to(device)
    attributes = {"strides": [stride, stride], "kernel_shape": list(kernel), **attributes}
    reference = lookup("Conv", 17)
    launch = BY_ID[CHOICE].launch({"choice": CHOICE, "stride": stride, "kernel": list(kernel)}, reference)
    with strict_fp32():
        got = launch.impl([x, launch.prepare_weights[1](w), b], attributes)
        expected = reference([x, w, b], attributes)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_resnet_stem_with_fused_relu_on_the_gpu(dtype, residual):
    """The stem at its real size through cuDNN's fused conv + bias (+ residual) + ReLU."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 224, 224, generator=generator).to("cuda", dtype)
    w = (torch.randn(64, 3, 7, 7, generator=generator) * 0.1).to("cuda", dtype)
    b = torch.randn(64, generator=generator).to("cuda", dtype)
    r = torch.randn(4, 64, 112, 112, generator=generator).to("cuda", dtype) if residual else None
    attributes = {"strides": [2, 2], "pads": [3, 3, 3, 3], "kernel_shape": [7, 7], "activation": "Relu"}
    reference = lookup("FusedConv", 1, "kiln")
    launch = BY_ID[CHOICE].launch({"choice": CHOICE, "stride": 2, "kernel": [7, 7]}, reference)
    got = launch.impl([x, launch.prepare_weights[1](w), b, r], attributes)
    expected = reference([t.double() if t is not None else None for t in (x, w, b, r)], attributes)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    step = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(got.double(), expected, rtol=step, atol=step * expected.abs().max().item())
