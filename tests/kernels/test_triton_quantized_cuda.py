"""The Triton quantized choices on the GPU at real shapes, against the ``ops`` reference.

The reference runs on the CPU: there it divides by the scale exactly, as the kernels do (on CUDA
PyTorch multiplies by the reciprocal, which can move a value across a rounding boundary), so
quantized values must agree exactly and layer outputs to float16 rounding; fp8 sums are held to
the bound of ``test_quantized_choices_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto
from torch import nn

import kiln
from kiln.kernels import fp8_gemm
from kiln.kernels.catalog import BY_ID
from kiln.ops.quantized import FLOAT8E4M3FN, INT8, UINT8, fake_quantize_activation
from kiln.ops.registry import lookup

pytestmark = pytest.mark.gpu
FP8_ACCUMULATION = 2.0**-10  # of |x_dq| @ |w|, as for cuBLASLt's fp8 GEMM
HALF = 2e-3  # float16 outputs: relative to the output's largest magnitude


def _needs_fp8(x_type):
    if x_type == FLOAT8E4M3FN and not fp8_gemm.fp8_tensor_cores():
        pytest.skip("fp8 tensor cores need compute capability 8.9 or newer")


def _run(choice_id, op, inputs, attributes):
    reference = lookup(op, 1, "kiln")
    expected = reference(inputs, reference.bind(attributes, torch.device("cpu"), 1))
    launch = BY_ID[choice_id].launch({"choice": choice_id}, reference)
    args = [None if x is None else x.cuda() for x in inputs]
    args = [launch.prepare_weights[i](x) if i in launch.prepare_weights else x for i, x in enumerate(args)]
    got = launch.impl(args, launch.impl.bind(attributes, torch.device("cuda"), 1))
    torch.cuda.synchronize()
    return got.cpu(), expected


def _check(got, expected, x_dq=None, w=None):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    error = (got.float() - expected.float()).abs()
    allowed = HALF * expected.float().abs().max()
    if x_dq is not None:  # fp8: the tensor cores' own summation error too
        allowed = allowed + FP8_ACCUMULATION * (x_dq.abs() @ w.abs()).max()
    assert error.max() <= allowed, f"off by {error.max().item()} (allowed {float(allowed)})"


def _weight(shape, x_type, g):
    if x_type == FLOAT8E4M3FN:
        return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("rows", [1, 17, 300, 8192])
@pytest.mark.parametrize("k, n", [(768, 3072), (264, 136), (100, 36)])
@pytest.mark.parametrize("x_type, zero_point, dynamic", [
    (INT8, 0, 1), (INT8, 0, 0), (UINT8, 117, 0), (FLOAT8E4M3FN, 0, 1), (FLOAT8E4M3FN, 0, 0),
])
def test_matmul(rows, k, n, x_type, zero_point, dynamic):
    _needs_fp8(x_type)
    g = torch.Generator().manual_seed(rows + k + n)
    x = (torch.randn(rows, k, generator=g) * 3).half()
    w_q = _weight((k, n), x_type, g)
    w_scale = torch.rand(n, generator=g) * 0.004 + 0.001
    bias = torch.randn(n, generator=g).half()
    residual = torch.randn(rows, n, generator=g).half()
    inverse_smooth = torch.rand(k, generator=g) + 0.05 if dynamic else None
    attributes = {"x_scale": 0.021, "x_zero_point": zero_point, "x_type": x_type, "dynamic": dynamic,
                  "activation": "Gelu", "residual_after_activation": 0}
    inputs = [x, w_q, w_scale, bias, residual, inverse_smooth]
    got, expected = _run("triton-quantized-gemm", "QuantizedMatMul", inputs, attributes)
    if x_type == FLOAT8E4M3FN:
        w = w_q.float() * w_scale
        scaled = x.float() * inverse_smooth if dynamic else x.float()
        scale = scaled.abs().amax(-1, keepdim=True) / 448 if dynamic else 0.021
        _check(got, expected, fake_quantize_activation(scaled, scale, 0, x_type), w)
    else:
        _check(got, expected)


@pytest.mark.parametrize("rows, k, n", [(300, 264, 136), (8192, 64, 256), (3136, 512, 2048), (200, 96, 40)])
@pytest.mark.parametrize("x_type", [INT8, FLOAT8E4M3FN])
def test_matmul_hands_over_with_an_8_bit_residual(rows, k, n, x_type):
    """An 8-bit input, residual and output (a quantized hand-off), as ResNet's 1x1 convolutions
    run: 16-byte aligned rows arrive by TMA (n=40's do not)."""
    _needs_fp8(x_type)
    g = torch.Generator().manual_seed(rows + k + n)
    x = _weight((rows, k), x_type, g)
    w_q = _weight((k, n), x_type, g)
    w_scale = torch.rand(n, generator=g) * 0.004 + 0.001
    bias = torch.randn(n, generator=g).half()
    residual = _weight((rows, n), x_type, g)
    storage = INT8 if x_type == INT8 else FLOAT8E4M3FN
    attributes = {"x_scale": 0.021, "x_zero_point": 0, "x_type": x_type, "dynamic": 0,
                  "activation": "Relu", "residual_after_activation": 0, "float_type": TensorProto.FLOAT16,
                  "y_type": storage, "y_scale": 0.5, "residual_scale": 0.03}
    inputs = [x, w_q, w_scale, bias, residual, None]
    got, expected = _run("triton-quantized-gemm", "QuantizedMatMul", inputs, attributes)
    assert got.dtype == expected.dtype
    # One step apart at most, and rarely: the reference sums products of dequantized values in
    # float32 (each rounded), the kernel sums the integers exactly; near a rounding boundary of
    # the output's quantization the difference can take a value to the other side.
    step = 1 if x_type == INT8 else expected.float().abs().clamp(min=1) / 8  # fp8: 3 mantissa bits
    steps = (got.float() - expected.float()).abs() / step
    assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-2


@pytest.mark.parametrize("shape", [
    # batch, channels, size, out channels, kernel, stride, padding
    (2, 64, 56, 64, 3, 1, 1), (3, 256, 14, 256, 3, 1, 1), (2, 3, 64, 64, 7, 2, 3),
    (2, 256, 28, 512, 1, 2, 0), (2, 64, 28, 256, 1, 1, 0), (1, 40, 9, 24, 3, 2, 1),
])
@pytest.mark.parametrize("x_type, zero_point", [(INT8, 0), (UINT8, 120), (FLOAT8E4M3FN, 0)])
def test_conv(shape, x_type, zero_point):
    _needs_fp8(x_type)
    batch, channels, size, out_channels, kernel, stride, padding = shape
    g = torch.Generator().manual_seed(channels + out_channels + kernel)
    x = (torch.randn(batch, channels, size, size, generator=g) * 2).half()
    w_q = _weight((out_channels, channels, kernel, kernel), x_type, g)
    w_scale = torch.rand(out_channels, generator=g) * 0.004 + 0.001
    bias = torch.randn(out_channels, generator=g).half()
    attributes = {"x_scale": 0.03, "x_zero_point": zero_point, "x_type": x_type,
                  "kernel_shape": [kernel, kernel], "strides": [stride, stride],
                  "pads": [padding] * 4, "activation": "Relu"}
    got, expected = _run("triton-quantized-conv", "QuantizedConv", [x, w_q, w_scale, bias], attributes)
    if x_type == FLOAT8E4M3FN:
        x_dq = fake_quantize_activation(x, 0.03, 0, x_type)
        magnitudes = torch.nn.functional.conv2d(
            x_dq.abs(), (w_q.float() * w_scale[:, None, None, None]).abs(), stride=stride, padding=padding)
        error = (got.float() - expected.float()).abs()
        assert (error - FP8_ACCUMULATION * magnitudes).max() <= HALF * expected.float().abs().max()
    else:
        _check(got, expected)


class ConvNet(nn.Module):
    """Convolutions of one group (3x3, strided, 1x1 with a residual) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1))
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.down(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_build_takes_the_triton_choices(tmp_path, precision):
    _needs_fp8(FLOAT8E4M3FN if precision == "fp8" else INT8)
    torch.manual_seed(0)
    path = tmp_path / "convnet.onnx"
    torch.onnx.export(ConvNet().eval(), (torch.randn(2, 3, 32, 32),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                      dynamo=False, opset_version=17)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    fp32 = kiln.build(str(path), device="cuda")
    quantized = kiln.build(str(path), device="cuda", precision=precision, calibration_data=batches,
                           fp16_fallback=False)  # every layer in 8 bits, however small
    choices = {layer["choice"] for layer in quantized.layers if layer["precision"] == precision}
    assert choices == {"triton-quantized-conv", "triton-quantized-gemm"}, choices
    # the block's 3x3 convolution hands its output to the 1x1 one quantized, that one to `down`
    steps = quantized.manifest["plan"]["steps"]
    assert sum("y_type" in step["attributes"] for step in steps) == 2
    feed = {"x": rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}
    a, b = (np.asarray(e.run(feed)["y"], dtype=np.float64).ravel() for e in (quantized, fp32))
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
