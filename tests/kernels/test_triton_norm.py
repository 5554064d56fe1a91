"""The fused residual + LayerNorm/RMSNorm Triton kernel against the ``ops`` reference.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (the test set-up
turns it on); on a GPU the compiled kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.triton_norm import norm_rows
from kiln.ops.fused_norm import layer_norm, rms_norm
from kiln.ops.quantized import FLOAT8E4M3FN, INT8, quantized_rows

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("q_type", [INT8, FLOAT8E4M3FN])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantized_rows_are_those_of_the_stored_output(device, rms, q_type, smooth):
    """Exactly what quantizing Y's rows after the norm gives (the product's own pass would)."""
    x, residual, scale, bias = _inputs((3, 7, 96), torch.float16, device, seed=4)
    x[1, 2] *= 50  # one row far larger than the others: its own scale
    generator = torch.Generator().manual_seed(5)
    inverse_smooth = (torch.rand(96, generator=generator) + 0.05).to(device) if smooth else None
    y, total, rows, row_scales = norm_rows(x, scale, None if rms else bias, residual, 1e-5, rms=rms,
                                           write_total=True, inverse_smooth=inverse_smooth,
                                           q_type=q_type)
    # on the CPU: on CUDA PyTorch divides by a Python number through its reciprocal
    expected_rows, expected_scales = quantized_rows(
        y.cpu(), None if inverse_smooth is None else inverse_smooth.cpu(), q_type
    )
    rows, row_scales = rows.cpu(), row_scales.cpu()
    assert rows.dtype == expected_rows.dtype and rows.shape == x.shape
    assert row_scales.dtype == torch.float32 and row_scales.shape == x.shape[:-1]
    assert torch.equal(row_scales, expected_scales)
    assert torch.equal(rows.float(), expected_rows.float())
    plain_y, plain_total = norm_rows(x, scale, None if rms else bias, residual, 1e-5, rms=rms,
                                     write_total=True)
    assert torch.equal(y, plain_y) and torch.equal(total, plain_total)


@pytest.mark.parametrize("device", DEVICES)
def test_the_choice_returns_the_outputs_the_node_has(device):
    """Y, the rows and their scales; with the sum between when the node outputs it."""
    from kiln.kernels.catalog import BY_ID
    from kiln.ops.registry import lookup

    x, residual, scale, bias = _inputs((4, 64), torch.float16, device, seed=6)
    reference = lookup("LayerNorm", 1, "kiln")
    launch = BY_ID["triton-layer-norm"].launch({"choice": "triton-layer-norm"}, reference)
    for num_outputs in (3, 4):
        attributes = launch.impl.bind({"q_type": INT8}, torch.device(device), num_outputs)
        got = launch.impl([x, scale, bias, residual], attributes)
        expected = reference([x, scale, bias, residual],
                             reference.bind({"q_type": INT8}, torch.device(device), num_outputs))
        assert len(got) == len(expected) == num_outputs
        assert [t.dtype for t in got] == [t.dtype for t in expected]
        torch.testing.assert_close(got[0].float(), expected[0].float(), rtol=2e-3, atol=8e-3)
        if num_outputs == 4:
            assert torch.equal(got[1], expected[1])  # the sum
        rows, row_scales = quantized_rows(got[0].cpu(), None, INT8)
        assert torch.equal(got[-2].cpu(), rows) and torch.equal(got[-1].cpu(), row_scales)
