"""Convolutions with stride = kernel as one GEMM over patches, against the ``ops`` convolution."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.arithmetic import strict_fp32
from kiln.kernels.catalog import BY_ID
from kiln.kernels.patch_gemm import is_patch_conv
from kiln.ops.registry import lookup

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("attributes,weight_shape,expected", [
    ({"strides": [16, 16]}, [768, 3, 16, 16], True),
    ({"strides": [4, 2], "kernel_shape": [4, 2], "pads": [0, 0, 0, 0]}, [8, 3, 4, 2], True),
    ({"strides": [16, 16], "auto_pad": "VALID"}, [768, 3, 16, 16], True),
    ({"strides": [8, 8]}, [768, 3, 16, 16], False),                       # overlapping windows
    ({"strides": [16, 16], "pads": [1, 1, 1, 1]}, [768, 3, 16, 16], False),
    ({"strides": [16, 16], "auto_pad": "SAME_UPPER"}, [768, 3, 16, 16], False),
    ({"strides": [16, 16], "dilations": [2, 2]}, [768, 3, 16, 16], False),
    ({"strides": [16, 16], "group": 3}, [768, 1, 16, 16], False),
    ({"strides": [16]}, [768, 3, 16], False),                             # 1-D
    ({"strides": [16, 16]}, [768, 3, "k", 16], False),                    # a symbolic weight dim
])
def test_which_convolutions_are_patch_gemms(attributes, weight_shape, expected):
    assert is_patch_conv(attributes, weight_shape) is expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(32, 48), (37, 50)])  # edges a window would run past are dropped
def test_patch_gemm_matches_the_convolution(device, bias, size):
    generator = torch.Generator().manual_seed(size[0])
    x = torch.randn(2, 3, *size, generator=generator).to(device)
    w = torch.randn(24, 3, 8, 16, generator=generator).to(device)
    b = torch.randn(24, generator=generator).to(device) if bias else None
    attributes = {"strides": [8, 16], "kernel_shape": [8, 16]}
    reference = lookup("Conv", 17)
    launch = BY_ID["patch-gemm"].launch({"choice": "patch-gemm", "kernel": [8, 16]}, reference)
    with strict_fp32():  # no TF32 on the GPU: the comparison is of fp32 results
        got = launch.impl([x, launch.prepare_weights[1](w), b], attributes)
        expected = reference([x, w, b], attributes)
    assert got.shape == expected.shape == (2, 24, size[0] // 8, size[1] // 16)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
