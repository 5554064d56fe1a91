"""The channels-last max-pooling Triton kernel against the ONNX MaxPool reference.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (the test set-up
turns it on); on a GPU the compiled kernel runs, through the engine's choice.
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels.catalog import BY_ID
from kiln.ops.registry import lookup

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.triton_interpreter),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
CASES = [  # shape, attributes
    ((2, 8, 15, 15), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # ResNet's
    ((1, 70, 9, 11), {"kernel_shape": [2, 3], "strides": [2, 1]}),  # channels past one block
    ((2, 4, 10, 10), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),  # windows past the input
    ((1, 3, 12, 12), {"kernel_shape": [2, 2], "dilations": [2, 3], "pads": [0, 1, 2, 1]}),
    ((1, 5, 7, 7), {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
]


def _run(x, attributes):
    reference = lookup("MaxPool", 12)
    expected = reference([x.cpu().float()], reference.bind(attributes, torch.device("cpu"), 1))
    choice = BY_ID["triton-max-pool"]
    launch = choice.launch({"choice": choice.id}, reference)
    got = launch.impl([x.contiguous(memory_format=torch.channels_last)],
                      launch.impl.bind(attributes, x.device, 1))
    return got, expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, attributes", CASES)
def test_max_pool_matches_the_reference(device, dtype, shape, attributes):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(device, dtype)
    got, expected = _run(x, attributes)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    # a maximum is one of its inputs: exact, whatever the type
    torch.testing.assert_close(got.cpu().float(), expected.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_in_a_window_is_its_maximum(device):
    x = torch.randn(1, 2, 6, 6)
    x[0, 1, 2, 3] = math.nan
    got, _ = _run(x.to(device), {"kernel_shape": [2, 2], "strides": [2, 2]})
    nans = torch.isnan(got.cpu())
    assert nans.sum() == 1 and nans[0, 1, 1, 1]
