"""The fused residual + LayerNorm/RMSNorm Triton kernel against the ``ops`` reference.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (the test set-up
turns it on); on a GPU the compiled kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.triton_norm import norm_rows
from kiln.ops.fused_norm import layer_norm, rms_norm

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.triton_interpreter),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _inputs(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3 + 1
    residual = torch.randn(shape, generator=generator)
    scale = torch.randn(shape[-1], generator=generator)
    bias = torch.randn(shape[-1], generator=generator)
    return [t.to(device, dtype) for t in (x, residual, scale, bias)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100), (1, 1)])
def test_layer_norm_with_residual_matches_the_reference(device, dtype, tolerance, shape):
    x, residual, scale, bias = _inputs(shape, dtype, device)
    y, total = norm_rows(x, scale, bias, residual, 1e-5, rms=False, write_total=True)
    expected_y, expected_total = layer_norm(x, scale, bias, residual, epsilon=1e-5, _num_outputs=2)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)  # rounded as X's type
    torch.testing.assert_close(y.float(), expected_y.float(), rtol=tolerance, atol=tolerance * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_without_residual_or_bias(device):
    x, _, scale, _ = _inputs((4, 33), torch.float32, device, seed=1)
    y, total = norm_rows(x, scale, None, None, 1e-6, rms=False, write_total=False)
    torch.testing.assert_close(y, layer_norm(x, scale, epsilon=1e-6), rtol=1e-5, atol=1e-5)
    assert total is x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(device, with_residual):
    x, residual, scale, _ = _inputs((2, 6, 40), torch.float32, device, seed=2)
    residual = residual if with_residual else None
    y, _ = norm_rows(x, scale, None, residual, 1e-5, rms=True, write_total=False)
    torch.testing.assert_close(y, rms_norm(x, scale, residual, epsilon=1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_rows_are_read_as_their_values(device):
    x, residual, scale, bias = _inputs((6, 40), torch.float32, device, seed=3)
    x_t = x.t().contiguous().t()  # same values, column-major
    y, _ = norm_rows(x_t, scale, bias, residual, 1e-5, rms=False, write_total=False)
    torch.testing.assert_close(y, layer_norm(x, scale, bias, residual), rtol=1e-5, atol=1e-5)
