"""The INT8/FP8 choices against the ``ops`` reference of kiln::QuantizedMatMul / QuantizedConv.

On the GPU at real shapes (row counts around torch._int_mm's limit of 16 included). The same
launches also run on the CPU, through torch's CPU ``_int_mm`` / ``_scaled_mm``, which checks the
glue (zero-point correction, padding of few rows, channels-last pixels) without a GPU. What each
choice supports is checked without a GPU too, except fp8's compute-capability test.

The int8 GEMM is exact: it differs from the reference by float rounding only. fp8 tensor cores
are not: on an H100 their sums stray from the exact ones by up to about 3e-4 of the sum of the
terms' magnitudes (``|x_dq| @ |w|``), so fp8 results are held to 2**-10 of that bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.kernels import fp8_gemm
from kiln.kernels.arithmetic import strict_fp32
from kiln.kernels.catalog import BY_ID, FALLBACK, choices_for
from kiln.lowering.spec import KernelSpec, ValueType
from kiln.ops.quantized import FLOAT8E4M3FN, INT8, UINT8, fake_quantize_activation
from kiln.ops.registry import lookup
from kiln.tune import TimingCache, Tuner

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INTEGER_QUANTIZATIONS = [(INT8, 0), (INT8, -3), (UINT8, 117)]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FP8_ACCUMULATION = 2.0**-10  # of |x_dq| @ |w| (see above)


def _run(choice_id, op, inputs, attributes, device, prepare=True):
    reference = lookup(op, 1, "kiln")
    launch = BY_ID[choice_id].launch({"choice": choice_id}, reference)
    args = [launch.prepare_weights[i](x) if prepare and i in launch.prepare_weights and x is not None
            else x for i, x in enumerate(inputs)]
    device = torch.device(device)
    with strict_fp32():  # as engines run their float32 arithmetic
        expected = reference(inputs, reference.bind(attributes, device, 1))
        try:
            got = launch.impl(args, launch.impl.bind(attributes, device, 1))
        except (NotImplementedError, RuntimeError) as error:
            if device.type == "cpu":  # a torch build without the CPU kernel
                pytest.skip(f"CPU {choice_id}: {str(error).splitlines()[0]}")
            raise
    return got, expected


def _close(got, expected, tolerance):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance * scale)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _operands(device, x_shape, k, n, weight_dtype, dtype, epilogue, seed=0):
    """x (some values saturate), w_q, w_scale, bias, residual: random, never zeros."""
    g = _generator(device, seed)
    x = (torch.randn(*x_shape, k, generator=g, device=device) * 3).to(dtype)
    if weight_dtype == torch.int8:
        w_q = torch.randint(-127, 128, (k, n), generator=g, device=device, dtype=torch.int8)
    else:  # beyond 448 torch's float8_e4m3fn conversion makes NaNs
        w_q = (torch.randn(k, n, generator=g, device=device) * 100).clamp(-448, 448).to(weight_dtype)
    w_scale = torch.rand(n, generator=g, device=device) * 0.004 + 0.001
    bias = torch.randn(n, generator=g, device=device).to(dtype) if epilogue else None
    residual = torch.randn(*x_shape, n, generator=g, device=device).to(dtype) if epilogue else None
    return [x, w_q, w_scale, bias, residual]


# Row counts: below, at and above torch._int_mm's minimum of 17, and large.
ROWS = {1: (1,), 16: (2, 8), 17: (17,), 128: (4, 32), 8192: (8, 1024)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("k, n", [(256, 384), (264, 136)])
@pytest.mark.parametrize("x_type, zero_point", INTEGER_QUANTIZATIONS)
@pytest.mark.parametrize("epilogue", [False, True])
def test_int8_gemm(device, rows, k, n, x_type, zero_point, epilogue):
    inputs = _operands(device, ROWS[rows], k, n, torch.int8, torch.float32, epilogue, seed=rows + k)
    attributes = {"x_scale": 0.021, "x_zero_point": zero_point, "x_type": x_type}
    if epilogue:
        attributes.update(activation="Relu", residual_after_activation=0)
    got, expected = _run("int8-gemm", "QuantizedMatMul", inputs, attributes, device)
    _close(got, expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prepare", [True, False])  # unprepared weights: column sums per call
def test_int8_gemm_16_bit_activations(device, dtype, prepare):
    inputs = _operands(device, (3, 50), 512, 256, torch.int8, dtype, True, seed=5)
    attributes = {"x_scale": 0.02, "x_zero_point": 140, "x_type": UINT8, "activation": "Relu",
                  "residual_after_activation": 1}
    got, expected = _run("int8-gemm", "QuantizedMatMul", inputs, attributes, device, prepare)
    _close(got, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, size", [(1, 4), (2, 14), (32, 16)])  # 16, 392, 8192 pixels
@pytest.mark.parametrize("x_type, zero_point", INTEGER_QUANTIZATIONS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_int8_conv1x1(device, batch, size, x_type, zero_point, channels_last):
    g = _generator(device, batch + size)
    c, o = 64, 96
    x = torch.randn(batch, c, size, size, generator=g, device=device) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_q = torch.randint(-127, 128, (o, c, 1, 1), generator=g, device=device, dtype=torch.int8)
    w_scale = torch.rand(o, generator=g, device=device) * 0.004 + 0.001
    bias = torch.randn(o, generator=g, device=device)
    residual = torch.randn(batch, o, size, size, generator=g, device=device)
    attributes = {"x_scale": 0.03, "x_zero_point": zero_point, "x_type": x_type,
                  "kernel_shape": [1, 1], "activation": "Relu"}
    got, expected = _run("int8-conv1x1", "QuantizedConv", [x, w_q, w_scale, bias, residual],
                         attributes, device)
    _close(got, expected, TOLERANCE[torch.float32])
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("k, n", [(256, 384), (512, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epilogue", [False, True])
def test_fp8_scaled_mm(device, rows, k, n, dtype, epilogue):
    if device == "cuda" and not fp8_gemm.fp8_tensor_cores():
        pytest.skip("fp8 tensor cores need compute capability 8.9 or newer")
    inputs = _operands(device, ROWS[rows], k, n, torch.float8_e4m3fn, dtype, epilogue, seed=rows + n)
    attributes = {"x_scale": 0.013, "x_type": FLOAT8E4M3FN}
    if epilogue:
        attributes.update(activation="Relu", residual_after_activation=1)
    got, expected = _run("fp8-scaled-mm", "QuantizedMatMul", inputs, attributes, device)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    x, w_q, w_scale = inputs[:3]
    magnitudes = fake_quantize_activation(x, 0.013, 0, FLOAT8E4M3FN).abs() @ (w_q.float().abs() * w_scale)
    # the activation and the residual after it add nothing to the product's error, only rounding
    tolerance = TOLERANCE[dtype] * (expected.float().abs() + 1e-2 * expected.float().abs().max())
    excess = (got.float() - expected.float()).abs() - FP8_ACCUMULATION * magnitudes - tolerance
    assert excess.max() <= 0, f"fp8 result beyond its bound by up to {excess.max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 17, 8192])
@pytest.mark.parametrize("choice, weight_dtype, x_type", [
    ("int8-gemm", torch.int8, INT8), ("fp8-scaled-mm", torch.float8_e4m3fn, FLOAT8E4M3FN),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamic_smoothed_rows(device, rows, choice, weight_dtype, x_type, dtype):
    """Per-row scales and SmoothQuant's per-channel factor, as calibrated transformers use them."""
    if device == "cuda" and x_type == FLOAT8E4M3FN and not fp8_gemm.fp8_tensor_cores():
        pytest.skip("fp8 tensor cores need compute capability 8.9 or newer")
    k, n = 256, 128
    inputs = _operands(device, ROWS[rows], k, n, weight_dtype, dtype, True, seed=rows)
    x = inputs[0]
    x[..., 3] *= 40  # an outlier channel, what smoothing is for
    inverse_smooth = torch.rand(k, generator=_generator(device, 1), device=device) + 0.05
    inverse_smooth[3] = 1 / 40
    attributes = {"x_type": x_type, "dynamic": 1, "activation": "Relu"}
    got, expected = _run(choice, "QuantizedMatMul", [*inputs, inverse_smooth], attributes, device)
    if x_type == INT8:
        _close(got, expected, TOLERANCE[dtype])
    else:  # fp8 accumulation: as test_fp8_scaled_mm bounds it
        bound = FP8_ACCUMULATION * expected.float().abs().max() * 8 + TOLERANCE[dtype] * expected.float().abs().max()
        assert (got.float() - expected.float()).abs().max() <= bound


# --- what the choices support --------------------------------------------------------------------

def _tensor(dtype, shape):
    return ValueType("tensor", dtype, shape)


def _matmul_spec(x_shape, w_shape, w_dtype=INT8, x_type=INT8, x_dtype=1):
    attributes = {"x_scale": {"float": 0.1}, "x_zero_point": {"int": 0}, "x_type": {"int": x_type}}
    inputs = (_tensor(x_dtype, x_shape), _tensor(w_dtype, w_shape), _tensor(1, (w_shape[-1],)),
              _tensor(x_dtype, (w_shape[-1],)))
    return KernelSpec.create("QuantizedMatMul", "kiln", 1, attributes, inputs,
                             (_tensor(x_dtype, (*x_shape[:-1], w_shape[-1])),))


def _conv_spec(w_shape, x_channels=None, x_type=UINT8, **conv):
    attributes = {"x_scale": {"float": 0.1}, "x_zero_point": {"int": 3}, "x_type": {"int": x_type}}
    attributes.update({name: {"ints" if isinstance(v, list) else "int": v} for name, v in conv.items()})
    x = _tensor(10, ("batch", x_channels or w_shape[1], 28, 28))
    inputs = (x, _tensor(INT8, w_shape), _tensor(1, (w_shape[0],)))
    return KernelSpec.create("QuantizedConv", "kiln", 1, attributes, inputs, (x,))


def test_int8_gemm_supports_aligned_weights_on_cuda_whatever_the_rows():
    choice = BY_ID["int8-gemm"]
    assert choice.supports(_matmul_spec(("batch", "seq", 256), (256, 512)), "cuda")
    assert choice.supports(_matmul_spec((1, 256), (256, 512)), "cuda")  # few rows: padded
    assert choice.supports(_matmul_spec((4, 256), (256, 512), x_type=UINT8, x_dtype=16), "cuda")
    assert not choice.supports(_matmul_spec((64, 256), (256, 512)), "cpu")
    assert not choice.supports(_matmul_spec((64, 260), (260, 512)), "cuda")  # K % 8
    assert not choice.supports(_matmul_spec((64, 256), (256, 500)), "cuda")  # N % 8
    assert not choice.supports(_matmul_spec((64, 256), ("k", 512)), "cuda")  # weight not static
    assert not choice.supports(_matmul_spec((64, 2**17), (2**17, 64)), "cuda")  # int32 overflow
    assert not choice.supports(_matmul_spec((64, 256), (256, 512), FLOAT8E4M3FN, FLOAT8E4M3FN), "cuda")


def test_int8_conv1x1_supports_pointwise_convolutions_only():
    choice = BY_ID["int8-conv1x1"]
    assert choice.supports(_conv_spec((96, 64, 1, 1)), "cuda")
    assert choice.supports(_conv_spec((96, 64, 1, 1), strides=[1, 1], pads=[0, 0, 0, 0], group=1), "cuda")
    assert choice.supports(_conv_spec((96, 64, 1, 1), auto_pad="SAME_UPPER"), "cuda")
    assert not choice.supports(_conv_spec((96, 64, 1, 1)), "cpu")
    assert not choice.supports(_conv_spec((96, 64, 3, 3), pads=[1, 1, 1, 1]), "cuda")
    assert not choice.supports(_conv_spec((96, 64, 1, 1), strides=[2, 2]), "cuda")
    assert not choice.supports(_conv_spec((96, 64, 1, 1), pads=[1, 1, 1, 1]), "cuda")
    assert not choice.supports(_conv_spec((96, 32, 1, 1), x_channels=64, group=2), "cuda")
    assert not choice.supports(_conv_spec((96, 12, 1, 1)), "cuda")  # C % 8
    assert not choice.supports(_conv_spec((90, 64, 1, 1)), "cuda")  # O % 8
    assert not choice.supports(_conv_spec((96, 64, 1, 1), x_type=FLOAT8E4M3FN), "cuda")


def test_fp8_scaled_mm_supports_multiples_of_16(monkeypatch):
    monkeypatch.setattr(fp8_gemm, "fp8_tensor_cores", lambda: True)
    choice = BY_ID["fp8-scaled-mm"]
    fp8 = dict(w_dtype=FLOAT8E4M3FN, x_type=FLOAT8E4M3FN)
    assert choice.supports(_matmul_spec(("batch", 256), (256, 512), **fp8), "cuda")
    assert choice.supports(_matmul_spec((1, 256), (256, 512), x_dtype=10, **fp8), "cuda")
    assert not choice.supports(_matmul_spec((8, 264), (264, 512), **fp8), "cuda")  # K % 16
    assert not choice.supports(_matmul_spec((8, 256), (256, 520), **fp8), "cuda")  # N % 16
    assert not choice.supports(_matmul_spec((8, 256), (256, 512), **fp8), "cpu")
    assert not choice.supports(_matmul_spec((8, 256), (256, 512)), "cuda")  # int8
    monkeypatch.setattr(fp8_gemm, "fp8_tensor_cores", lambda: False)
    assert not choice.supports(_matmul_spec((8, 256), (256, 512), **fp8), "cuda")


@pytest.mark.gpu
def test_fp8_scaled_mm_follows_the_compute_capability():
    spec = _matmul_spec((8, 256), (256, 512), FLOAT8E4M3FN, FLOAT8E4M3FN)
    expected = torch.cuda.get_device_capability() >= (8, 9)
    assert BY_ID["fp8-scaled-mm"].supports(spec, "cuda") == expected


def test_quantized_layers_take_their_choice_untimed():
    """Integer weights keep quantized specs from being timed: the first choice is the default,
    which is why these choices are not timed_only."""
    spec = _matmul_spec(("batch", 128, 256), (256, 512), x_type=UINT8)
    assert choices_for(spec, "cuda") == [BY_ID["triton-quantized-gemm"], BY_ID["int8-gemm"], FALLBACK]
    assert choices_for(spec, "cpu") == [FALLBACK]
    selection = Tuner("cuda", 3, TimingCache(), symbols={"batch": 4}, target={}).select(spec)
    assert selection.choice.id == "triton-quantized-gemm" and selection.timings == {}
    conv = _conv_spec((96, 64, 1, 1))
    assert choices_for(conv, "cuda") == [BY_ID["triton-quantized-conv"], BY_ID["int8-conv1x1"], FALLBACK]


def test_prepared_weights_keep_their_values():
    w = torch.from_numpy(np.random.default_rng(0).integers(-127, 128, (24, 40)).astype(np.int8))
    launch = BY_ID["int8-gemm"].launch({"choice": "int8-gemm"}, lookup("QuantizedMatMul", 1, "kiln"))
    prepared = launch.prepare_weights[1](w)
    assert torch.equal(prepared, w) and prepared.stride() == (1, 24)  # column-major
    assert launch.prepare_weights[1](prepared) is prepared
    fp8 = w.float().to(torch.float8_e4m3fn)
    launch = BY_ID["fp8-scaled-mm"].launch({"choice": "fp8-scaled-mm"}, lookup("QuantizedMatMul", 1, "kiln"))
    prepared = launch.prepare_weights[1](fp8)
    assert torch.equal(prepared.float(), fp8.float()) and prepared.stride() == (1, 24)
