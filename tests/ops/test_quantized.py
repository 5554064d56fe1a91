"""kiln::QuantizedMatMul and kiln::QuantizedConv against the fake-quantization contract, computed
independently in NumPy (float64, quantization's division in float32 as the contract says)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from kiln.ops.quantized import (
    FLOAT8E4M3FN, INT8, UINT8, dequantize_activation, quantize_activation, quantize_activation_int8,
    quantized_matmul,
)
from kiln.ops.registry import lookup

QMATMUL = lookup("QuantizedMatMul", 1, "kiln")
QCONV = lookup("QuantizedConv", 1, "kiln")
RANGES = {INT8: (-128, 127), UINT8: (0, 255)}
# (x_type, x_zero_point): symmetric int8, asymmetric int8, uint8 with its zero point inside, fp8
QUANTIZATIONS = [(INT8, 0), (INT8, -5), (UINT8, 117), (FLOAT8E4M3FN, 0)]


# --- the contract in NumPy --------------------------------------------------------------------

def np_fake_quantize(x: np.ndarray, scale: float, zero_point: int, x_type: int) -> np.ndarray:
    scaled = x.astype(np.float32) / np.float32(scale)  # float32 division, as the contract says
    if x_type == FLOAT8E4M3FN:
        q = np.clip(scaled, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return q * scale
    low, high = RANGES[x_type]
    q = np.clip(np.rint(scaled.astype(np.float64)) + zero_point, low, high)  # rint: half to even
    return (q - zero_point) * scale


def np_epilogue(y, residual, activation, after):
    if residual is not None and not after:
        y = y + residual
    if activation == "Relu":
        y = np.maximum(y, 0)
    if residual is not None and after:
        y = y + residual
    return y


def np_conv(x, w, pads, strides, group):
    """Direct 2-D convolution: x [N, C, H, W], w [O, C/group, kh, kw], ONNX pads order."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    per_group_in, per_group_out = x.shape[1] // group, w.shape[0] // group
    return np.concatenate([
        np.einsum("nchwij,ocij->nohw", windows[:, g * per_group_in:(g + 1) * per_group_in],
                  w[g * per_group_out:(g + 1) * per_group_out])
        for g in range(group)
    ], axis=1)


# --- random operands (never zeros) -------------------------------------------------------------

def random_weight(rng, shape, x_type):
    """(w_q as torch, its values as float64)."""
    if x_type == FLOAT8E4M3FN:
        values = np.clip(rng.standard_normal(shape) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        return torch.from_numpy(values.view(np.uint8)).view(torch.float8_e4m3fn), values.astype(np.float64)
    values = rng.integers(-127, 128, shape).astype(np.int8)
    return torch.from_numpy(values), values.astype(np.float64)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(np.float64)


def assert_matches(got: torch.Tensor, expected: np.ndarray, dtype: torch.dtype):
    assert got.dtype == dtype and tuple(got.shape) == expected.shape
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(as_numpy(got), expected, rtol=tolerance, atol=tolerance * scale)


# --- QuantizedMatMul ----------------------------------------------------------------------------

@pytest.mark.parametrize("x_type, zero_point", QUANTIZATIONS)
@pytest.mark.parametrize("epilogue", ["none", "bias-relu", "residual-before", "residual-after"])
def test_matmul_matches_the_contract(x_type, zero_point, epilogue):
    rng = np.random.default_rng(x_type * 10 + len(epilogue))
    k, n = 48, 24
    x = torch.from_numpy(rng.standard_normal((2, 5, k)).astype(np.float32) * 3)  # some saturate
    w_q, w = random_weight(rng, (k, n), x_type)
    w_scale = torch.from_numpy(rng.uniform(0.01, 0.05, n).astype(np.float32))
    x_scale = 0.037
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if epilogue != "none" else None
    residual = (torch.from_numpy(rng.standard_normal((2, 5, n)).astype(np.float32))
                if epilogue.startswith("residual") else None)
    attributes = {
        "x_scale": x_scale, "x_zero_point": zero_point, "x_type": x_type,
        "activation": "Relu" if epilogue != "none" else "",
        "residual_after_activation": int(epilogue == "residual-after"),
    }
    got = QMATMUL([x, w_q, w_scale, bias, residual], attributes)

    y = np_fake_quantize(x.numpy(), x_scale, zero_point, x_type) @ (w * as_numpy(w_scale))
    if bias is not None:
        y = y + as_numpy(bias)
    expected = np_epilogue(y, None if residual is None else as_numpy(residual),
                           attributes["activation"], attributes["residual_after_activation"])
    assert_matches(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_type, zero_point", [(UINT8, 131), (FLOAT8E4M3FN, 0)])
def test_matmul_output_follows_the_activation_dtype(dtype, x_type, zero_point):
    rng = np.random.default_rng(7)
    k, n = 32, 16
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32)).to(dtype)
    w_q, w = random_weight(rng, (k, n), x_type)
    w_scale = torch.from_numpy(rng.uniform(0.01, 0.05, n).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    attributes = {"x_scale": 0.02, "x_zero_point": zero_point, "x_type": x_type}
    got = QMATMUL([x, w_q, w_scale, bias], attributes)
    expected = np_fake_quantize(as_numpy(x), 0.02, zero_point, x_type) @ (w * as_numpy(w_scale))
    assert_matches(got, expected + as_numpy(bias), dtype)


# --- QuantizedConv ------------------------------------------------------------------------------

@pytest.mark.parametrize("x_type, zero_point", QUANTIZATIONS)
@pytest.mark.parametrize("group, pads, strides", [
    (1, [0, 0, 0, 0], [1, 1]),
    (2, [1, 2, 1, 0], [1, 1]),  # grouped, asymmetric padding
    (4, [1, 1, 1, 1], [2, 1]),
])
def test_conv_matches_the_contract(x_type, zero_point, group, pads, strides):
    rng = np.random.default_rng(group * 100 + x_type)
    c, o = 8, 12
    x = torch.from_numpy(rng.standard_normal((2, c, 7, 6)).astype(np.float32) * 2)
    w_q, w = random_weight(rng, (o, c // group, 3, 3), x_type)
    w_scale = torch.from_numpy(rng.uniform(0.005, 0.02, o).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(o).astype(np.float32))
    attributes = {
        "x_scale": 0.03, "x_zero_point": zero_point, "x_type": x_type, "group": group,
        "pads": pads, "strides": strides, "kernel_shape": [3, 3], "activation": "Relu",
    }
    x_dq = np_fake_quantize(x.numpy(), 0.03, zero_point, x_type)
    y = np_conv(x_dq, w * as_numpy(w_scale)[:, None, None, None], pads, strides, group)
    y = y + as_numpy(bias)[None, :, None, None]
    residual = torch.from_numpy(rng.standard_normal(y.shape).astype(np.float32))
    got = QCONV([x, w_q, w_scale, bias, residual], attributes)
    assert_matches(got, np.maximum(y + as_numpy(residual), 0), torch.float32)


def test_conv_output_follows_the_activation_dtype():
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal((1, 16, 5, 5)).astype(np.float32)).half()
    w_q, w = random_weight(rng, (8, 16, 1, 1), INT8)
    w_scale = torch.from_numpy(rng.uniform(0.005, 0.02, 8).astype(np.float32))
    got = QCONV([x, w_q, w_scale], {"x_scale": 0.05, "x_type": INT8})
    expected = np_conv(np_fake_quantize(as_numpy(x), 0.05, 0, INT8),
                       w * as_numpy(w_scale)[:, None, None, None], [0, 0, 0, 0], [1, 1], 1)
    assert_matches(got, expected, torch.float16)


# --- rounding and saturation, by hand ----------------------------------------------------------

def test_integer_quantization_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 1e9, -128.5, -129.0, -1e9])
    assert quantize_activation(x, 1.0, 0, INT8).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128, -128]
    # scale 0.5: x / 0.5 is exact; zero point 10 added after rounding, then saturated to [0, 255]
    x = torch.tensor([0.25, 0.75, -5.25, -5.5, -6.0, 122.75, 123.25, 300.0])
    q = quantize_activation(x, 0.5, 10, UINT8)
    assert q.dtype == torch.uint8
    assert q.tolist() == [10, 12, 0, 0, 0, 255, 255, 255]
    assert dequantize_activation(q, 0.5, 10).tolist() == [0.0, 1.0, -5.0, -5.0, -5.0, 122.5, 122.5, 122.5]


def test_uint8_in_int8_storage_keeps_the_differences_to_the_zero_point():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(200).astype(np.float32) * 4)
    xq = quantize_activation(x, 0.02, 77, UINT8)
    xq8, zero_point8 = quantize_activation_int8(x, 0.02, 77, UINT8)
    assert xq8.dtype == torch.int8 and zero_point8 == 77 - 128
    assert torch.equal(xq8.int() - zero_point8, xq.int() - 77)
    assert xq.min() == 0 and xq.max() == 255  # both ends saturated
    int8, zero_point = quantize_activation_int8(x, 0.02, 0, INT8)
    assert zero_point == 0 and torch.equal(int8, quantize_activation(x, 0.02, 0, INT8))


def test_fp8_quantization_rounds_to_nearest_even_and_saturates():
    # float8_e4m3fn has 3 mantissa bits: between 1 and 2 its step is 0.125, between 256 and 448
    # it is 32; subnormals are multiples of 2**-9
    x = torch.tensor([1.0625, 1.1875, -1.0625, 300.0, 460.0, 1e6, -1e6, 2.0**-10, 3 * 2.0**-10])
    q = quantize_activation(x, 1.0, 0, FLOAT8E4M3FN)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [1.0, 1.25, -1.0, 288.0, 448.0, 448.0, -448.0, 0.0, 2.0**-8]
    assert dequantize_activation(q, 0.5).tolist()[:3] == [0.5, 0.625, -0.5]


def test_saturation_shows_in_the_layer_output():
    """An identity weight passes x_dq through: large inputs come out at the type's limits."""
    x = torch.tensor([[2.5, -2.5, 1e4, -1e4, 0.75, 3.5, 126.5, -300.0]])
    eye = torch.eye(8, dtype=torch.int8)
    ones = torch.ones(8)
    y = QMATMUL([x, eye, ones], {"x_scale": 1.0, "x_type": INT8})
    assert y.tolist() == [[2.0, -2.0, 127.0, -128.0, 1.0, 4.0, 126.0, -128.0]]
    y = QMATMUL([x, eye, ones], {"x_scale": 1.0, "x_zero_point": 100, "x_type": UINT8})
    assert y.tolist() == [[2.0, -2.0, 155.0, -100.0, 1.0, 4.0, 126.0, -100.0]]
    fp8_eye = torch.eye(8).to(torch.float8_e4m3fn)
    y = QMATMUL([x, fp8_eye, ones], {"x_scale": 1.0, "x_type": FLOAT8E4M3FN})
    assert y.tolist() == [[2.5, -2.5, 448.0, -448.0, 0.75, 3.5, 128.0, -288.0]]


def test_unknown_activation_type_is_refused():
    with pytest.raises(ValueError, match="x_type"):
        quantize_activation(torch.ones(3), 1.0, 0, 1)


def test_dynamic_rows_with_smoothing_match_numpy():
    """dynamic=1: each row quantized by its own abs-max / 127 after the SmoothQuant factor."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    x[..., 2] *= 30
    w = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    w_scale = (rng.random(8) * 0.01 + 0.001).astype(np.float32)
    inverse = (rng.random(16) + 0.5).astype(np.float32)
    inverse[2] = 1 / 30
    got = quantized_matmul(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(w_scale),
                           None, None, torch.from_numpy(inverse), x_type=3, dynamic=1).numpy()
    smoothed = x.astype(np.float64) * inverse
    scale = np.abs(smoothed).max(-1, keepdims=True) / 127
    x_dq = np.clip(np.round(smoothed / scale), -128, 127) * scale
    expected = x_dq @ (w.astype(np.float64) * w_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # the outlier channel no longer dominates: an error far below the unsmoothed per-row one
    plain = x.astype(np.float64)
    plain_scale = np.abs(plain).max(-1, keepdims=True) / 127
    unsmoothed = np.clip(np.round(plain / plain_scale), -128, 127) * plain_scale
    weight = w.astype(np.float64) * w_scale * inverse[:, None]  # what x itself is multiplied by
    exact = x.astype(np.float64) @ weight
    assert np.abs(got - exact).mean() < 0.5 * np.abs(unsmoothed @ weight - exact).mean()
