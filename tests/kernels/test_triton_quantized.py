"""The Triton quantization, GEMM and convolution kernels against :mod:`kiln.ops.quantized`, on the
CPU through Triton's interpreter, at tiny and odd sizes.

Without a GPU, the test set-up runs Triton in its interpreter (``TRITON_INTERPRET=1``); with one,
these tests skip and the GPU tests (``test_triton_quantized_cuda.py``) run the same kernels compiled.

Quantized values are compared exactly; layer outputs to float32 rounding (the reference sums
dequantized float32 products, the kernels exact integers scaled once).
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import (
    triton_epilogue, triton_quantize, triton_quantized_conv, triton_quantized_gemm,
)
from kiln.kernels.int8_gemm import column_major
from kiln.ops import quantized as ops
from kiln.ops.activation import ACTIVATIONS

pytestmark = pytest.mark.triton_interpreter

FP8 = ops.FLOAT8E4M3FN
STATIC = [(ops.INT8, 0), (ops.INT8, -3), (ops.UINT8, 117), (FP8, 0)]
TOLERANCE = 2e-6  # of the output's largest magnitude
GELU_FORMS_DIFFERENCE = 5e-4  # the tanh form of GELU from erf's, at most


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activation(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows, some beyond the quantization range, read through a row stride wider than K."""
    x = torch.randn(rows, k + 3, generator=_generator(seed)) * 3
    x[:, 0] *= 40
    return x.to(dtype)[:, :k]


def _weight(k: int, n: int, float8: bool, seed: int) -> torch.Tensor:
    g = _generator(seed)
    if float8:
        return (torch.randn(k, n, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOLERANCE, atol=TOLERANCE * scale)


@pytest.mark.parametrize("rows, k", [(1, 5), (17, 300), (3, 8200)])  # 8200: two passes over a row
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_type", [ops.INT8, FP8])
@pytest.mark.parametrize("smooth", [False, True])
def test_dynamic_rows_match_the_reference_exactly(rows, k, dtype, x_type, smooth):
    x = _activation(rows, k, dtype, seed=rows + k)
    inverse_smooth = torch.rand(k, generator=_generator(1)) + 0.05 if smooth else None
    q, scales = triton_quantize.quantize_rows_dynamic(x, inverse_smooth, x_type == FP8)
    values, expected_scales = ops.matmul_activation(x, inverse_smooth, 0.0, x_type, 1)
    expected = ops.quantize_activation(values, expected_scales, 0, x_type)
    assert torch.equal(scales, expected_scales.reshape(-1))
    assert q.dtype == expected.dtype and torch.equal(q.float(), expected.float())


def test_an_all_zero_row_gets_the_floor_scale():
    x = torch.zeros(2, 16)
    x[1, 3] = 1.0
    q, scales = triton_quantize.quantize_rows_dynamic(x, None, False)
    assert torch.equal(scales, ops.row_scales(x).reshape(-1))
    assert torch.equal(q[0], torch.zeros(16, dtype=torch.int8)) and q[1, 3] == 127


@pytest.mark.parametrize("x_type, zero_point", STATIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, k", [(1, 7), (300, 40)])
def test_static_quantization_matches_the_reference_exactly(x_type, zero_point, dtype, rows, k):
    x = _activation(rows, k, dtype, seed=k)
    q, zero_point8 = triton_quantize.quantize_rows_static(x, 0.021, zero_point, x_type, x_type == FP8)
    if x_type == FP8:
        expected, expected_zero_point = ops.quantize_activation(x, 0.021, 0, FP8), 0
    else:
        expected, expected_zero_point = ops.quantize_activation_int8(x, 0.021, zero_point, x_type)
    assert zero_point8 == expected_zero_point
    assert q.dtype == expected.dtype and torch.equal(q.float(), expected.float())


def test_ties_round_half_to_even_and_saturate():
    scale = 0.5
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 200.0, -129.5, -1e9])
    x = (halves * scale)[None, :]
    q, _ = triton_quantize.quantize_rows_static(x, scale, 0, ops.INT8, False)
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128]]
    # every float8_e4m3fn value, the midpoints between neighbours (ties), and just off them
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    middles = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, middles, middles * (1 + 1e-6), middles * (1 - 1e-6), torch.tensor([1e-30, 500.0])])
    x = (x * scale)[None, :]
    q, _ = triton_quantize.quantize_rows_static(x, scale, 0, FP8, True)
    assert torch.equal(q.float(), ops.quantize_activation(x, scale, 0, FP8).float())


def test_rows_must_be_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        triton_quantize.quantize_rows_static(torch.ones(2, 3, 4), 0.1, 0, ops.INT8, False)


@pytest.mark.parametrize("rows, k, n", [(1, 40, 24), (17, 100, 36), (33, 7, 5)])
@pytest.mark.parametrize("x_type, zero_point", STATIC)
@pytest.mark.parametrize("residual_after", [0, 1])
def test_gemm_with_static_scale(rows, k, n, x_type, zero_point, residual_after):
    _check_gemm(rows, k, n, x_type, zero_point, residual_after)


@pytest.mark.parametrize("k", [64, 80])  # whole 32-deep blocks, and not
@pytest.mark.parametrize("x_type, zero_point", STATIC)
def test_gemm_depth_in_whole_blocks_or_not(k, x_type, zero_point):
    config = triton_quantized_gemm.GemmConfig(16, 32, 32, 2, 4, 2)
    _check_gemm(35, k, 40, x_type, zero_point, 0, config)


def _check_gemm(rows, k, n, x_type, zero_point, residual_after, config=None):
    float8 = x_type == FP8
    g = _generator(rows + n)
    x = _activation(rows, k, torch.float32, seed=rows)
    w_q = _weight(k, n, float8, seed=k)
    w_scale = torch.rand(n, generator=g) * 0.004 + 0.001
    bias, residual = torch.randn(n, generator=g), torch.randn(rows, n, generator=g)
    attributes = dict(x_scale=0.021, x_zero_point=zero_point, x_type=x_type, activation="Relu",
                      residual_after_activation=residual_after)
    expected = ops.quantized_matmul(x, w_q, w_scale, bias, residual, **attributes)
    q, zero_point8 = triton_quantize.quantize_rows_static(x, 0.021, zero_point, x_type, float8)
    got = triton_quantized_gemm.quantized_gemm(
        q, column_major(w_q), 0.021, w_scale, zero_point=zero_point8,
        colsum=None if float8 else w_q.sum(0, dtype=torch.int32), bias=bias, residual=residual,
        residual_after_activation=residual_after, activation="Relu", out_dtype=torch.float32,
        config=config,
    )
    _close(got, expected)


@pytest.mark.parametrize("y_type", [ops.INT8, FP8])
def test_gemm_hands_its_output_over_quantized(y_type):
    """An int8 or fp8 output, quantized with the next layer's scale from float32 epilogue values:
    the reference's values, but where the two float32 results straddle a rounding boundary (the
    kernel's GELU, in its tanh form, is up to 5e-4 from the reference's, an absolute difference that
    spans several of fp8's steps near zero)."""
    rows, k, n = 33, 72, 40
    x = _activation(rows, k, torch.float32, seed=5)
    w_q = _weight(k, n, False, seed=6)
    w_scale = torch.rand(n, generator=_generator(7)) * 0.004 + 0.001
    attributes = dict(x_scale=0.021, x_type=ops.INT8, activation="Gelu", y_type=y_type, y_scale=0.05)
    expected = ops.quantized_matmul(x, w_q, w_scale, **attributes)
    q, _ = triton_quantize.quantize_rows_static(x, 0.021, 0, ops.INT8, False)
    got = triton_quantized_gemm.quantized_gemm(
        q, column_major(w_q), 0.021, w_scale, activation="Gelu",
        out_dtype=ops.ACTIVATION_DTYPES[y_type], out_scale=0.05,
    )
    _same_quantized(got, expected, absolute=GELU_FORMS_DIFFERENCE / 0.05)


def _same_quantized(got: torch.Tensor, expected: torch.Tensor, absolute: float = 0.0) -> None:
    """One step apart at most, where the float values differed; ``absolute`` more (in steps of
    the quantized values) where the kernel computes the epilogue in another form."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.int8:
        steps = (got.int() - expected.int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    else:  # one float8 step: 2**-3 of the value
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.125, atol=2**-9 + absolute)


def test_quantized_output_needs_a_scale():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="out_scale"):
        triton_quantized_gemm.quantized_gemm(q, column_major(torch.zeros(8, 16, dtype=torch.int8)),
                                             0.1, torch.ones(16), out_dtype=torch.int8)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gemm_epilogue_activations(activation):
    """Each activation on dynamic, smoothed rows with a float16 output and a broadcast residual."""
    rows, k, n = 9, 24, 20
    x = _activation(rows, k, torch.float16, seed=3)
    w_q = _weight(k, n, False, seed=4)
    w_scale = torch.rand(1, generator=_generator(5)) * 0.004 + 0.001  # one scale for all columns
    inverse_smooth = torch.rand(k, generator=_generator(6)) + 0.5
    residual = torch.randn(n, generator=_generator(7)).half()
    params = {"Clip": [-0.5, 0.75], "LeakyRelu": [0.2], "Elu": [0.5], "HardSigmoid": [0.3, 0.4]}
    attributes = dict(x_type=ops.INT8, dynamic=1, activation=activation,
                      activation_params=params.get(activation))
    expected = ops.quantized_matmul(x, w_q, w_scale, None, residual, inverse_smooth, **attributes)
    q, scales = triton_quantize.quantize_rows_dynamic(x, inverse_smooth, False)
    got = triton_quantized_gemm.quantized_gemm(
        q, column_major(w_q), scales, w_scale, residual=residual, activation=activation,
        activation_params=params.get(activation), out_dtype=torch.float16,
    )
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3, atol=1e-3)


def test_gemm_rejects_row_major_weights():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="K-contiguous"):
        triton_quantized_gemm.quantized_gemm(q, torch.zeros(8, 16, dtype=torch.int8), 0.1, torch.ones(16))


@pytest.mark.parametrize("shape", [
    # batch, channels, height, width, out channels, kernel, stride, padding, dilation
    (2, 3, 9, 9, 16, 3, 2, 1, 1),  # few channels: the flattened window
    (1, 40, 6, 7, 20, 3, 1, 1, 1),
    (2, 36, 7, 7, 10, 1, 2, 0, 1),  # strided 1x1
    (1, 33, 8, 8, 9, 3, 1, 2, 2),  # dilated
])
@pytest.mark.parametrize("x_type, zero_point", STATIC)
def test_implicit_gemm_convolution(shape, x_type, zero_point):
    _check_convolution(shape, x_type, zero_point)


@pytest.mark.parametrize("channels", [64, 48])  # whole 32-channel blocks per tap, and not
@pytest.mark.parametrize("x_type, zero_point", [(ops.INT8, 0), (ops.UINT8, 117), (FP8, 0)])
def test_convolution_channels_in_whole_blocks_or_not(channels, x_type, zero_point):
    config = triton_quantized_conv.ConvConfig(32, 16, 32, 4, 2)
    _check_convolution((1, channels, 5, 6, 16, 3, 1, 1, 1), x_type, zero_point, config)


def _check_convolution(shape, x_type, zero_point, config=None):
    batch, channels, height, width, out_channels, kernel, stride, padding, dilation = shape
    float8 = x_type == FP8
    g = _generator(channels + out_channels)
    x = (torch.randn(batch, channels, height, width, generator=g) * 2).contiguous(
        memory_format=torch.channels_last)
    w_q = _weight(out_channels * channels * kernel * kernel, 1, float8, seed=channels).reshape(
        out_channels, channels, kernel, kernel)
    w_scale = torch.rand(out_channels, generator=g) * 0.004 + 0.001
    bias = torch.randn(out_channels, generator=g)
    attributes = dict(x_scale=0.03, x_zero_point=zero_point, x_type=x_type,
                      kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[padding] * 4,
                      dilations=[dilation, dilation], activation="Relu")
    out_size = ops.quantized_conv(x, w_q, w_scale, bias, None, **attributes).shape
    residual = torch.randn(out_size, generator=g)
    expected = ops.quantized_conv(x, w_q, w_scale, bias, residual, **attributes)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)
    q, zero_point8 = triton_quantize.quantize_rows_static(pixels, 0.03, zero_point, x_type, float8)
    got = triton_quantized_conv.quantized_conv2d(
        q.view(batch, height, width, channels), w_q.contiguous(memory_format=torch.channels_last),
        0.03, w_scale, strides=[stride, stride], pads=[padding, padding],
        dilations=[dilation, dilation], output_size=out_size[2:], zero_point=zero_point8,
        colsum=w_q.sum((1, 2, 3), dtype=torch.int32) if not float8 else None, bias=bias,
        residual=residual, activation="Relu", out_dtype=torch.float32, config=config,
    )
    _close(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("y_type", [ops.INT8, FP8])
def test_convolution_takes_and_hands_over_quantized_values(y_type):
    """A convolution reading int8 values a producer quantized (no quantization pass of its own),
    adding an int8 residual, and writing its output quantized for the next layer, channels-last."""
    g = _generator(11)
    xq = torch.randint(-127, 128, (2, 40, 6, 7), generator=g, dtype=torch.int8)
    xq = xq.contiguous(memory_format=torch.channels_last)
    w_q = _weight(24 * 40 * 9, 1, False, seed=12).reshape(24, 40, 3, 3)
    w_scale = torch.rand(24, generator=g) * 0.004 + 0.001
    residual = torch.randint(-127, 128, (2, 24, 6, 7), generator=g, dtype=torch.int8)
    residual = residual.contiguous(memory_format=torch.channels_last)
    attributes = dict(x_scale=0.03, x_type=ops.INT8, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                      activation="Relu", y_type=y_type, y_scale=0.02, float_type=10,
                      residual_scale=0.004)
    expected = ops.quantized_conv(xq, w_q, w_scale, None, residual, **attributes)
    got = triton_quantized_conv.quantized_conv2d(
        xq.permute(0, 2, 3, 1), w_q.contiguous(memory_format=torch.channels_last), 0.03, w_scale,
        strides=[1, 1], pads=[1, 1], dilations=[1, 1], output_size=[6, 7], residual=residual,
        activation="Relu", out_dtype=ops.ACTIVATION_DTYPES[y_type], out_scale=0.02,
        residual_scale=0.004,
    )
    assert got.is_contiguous(memory_format=torch.channels_last)
    _same_quantized(got, expected)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="Swish"):
        triton_epilogue.activation_arguments("Swish", None)
    with pytest.raises(ValueError, match="Clip"):
        triton_epilogue.activation_arguments("Clip", [0.0])


@pytest.mark.parametrize("attributes", [
    {"kernel_shape": [7, 7], "strides": [2, 2], "pads": [3, 3, 3, 3]},  # a stem on 3 channels
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"kernel_shape": [1, 1], "strides": [2, 2]},
    {"kernel_shape": [1, 1], "residual": True},  # the GEMM over pixels, with a shortcut
    {"kernel_shape": [1, 1], "pads": [0, 0, 1, 1]},  # padded: not a plain GEMM
])
def test_conv_choice_glue_on_the_cpu(attributes):
    """The choice's own steps (pads, channels-last pixels, prepared weights, 1x1 windows as the
    GEMM over pixels) with CPU tensors."""
    from kiln.kernels.catalog import BY_ID
    from kiln.ops.registry import lookup

    g = _generator(9)
    channels = 3 if attributes["kernel_shape"] == [7, 7] else 40
    x = (torch.randn(2, channels, 11, 11, generator=g) * 2).half()  # NCHW, not channels-last
    w_q = torch.randint(-127, 128, (24, channels, *attributes["kernel_shape"]), generator=g,
                        dtype=torch.int8)
    w_scale = torch.rand(24, generator=g) * 0.004 + 0.001
    bias = torch.randn(24, generator=g).half()
    residual = torch.randn(2, 24, 11, 11, generator=g).half() if attributes.pop("residual", False) else None
    attributes = {**attributes, "x_scale": 0.03, "x_zero_point": 100, "x_type": ops.UINT8,
                  "activation": "Relu"}
    reference = lookup("QuantizedConv", 1, "kiln")
    expected = reference([x, w_q, w_scale, bias, residual],
                         reference.bind(attributes, torch.device("cpu"), 1))
    launch = BY_ID["triton-quantized-conv"].launch({"choice": "triton-quantized-conv"}, reference)
    args = [x, launch.prepare_weights[1](w_q), w_scale, bias, residual]
    got = launch.impl(args, launch.impl.bind(attributes, torch.device("cpu"), 1))
    assert got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3,
                               atol=1e-3 * expected.float().abs().max().item())
