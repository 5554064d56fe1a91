"""INT8 / FP8 builds on the CPU: calibrated (implicit) and from the model's Q/DQ pairs (explicit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

import kiln
from kiln.errors import ConfigError, InputError


class SmallNet(nn.Module):
    """Convolutions (one grouped, one strided), a residual, and a classifier head of Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 16, 1)
        )
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.down(x))
        return self.head(x.mean(dim=(2, 3)))


def _batches(count: int, batch: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = SmallNet().eval()
    with torch.no_grad():  # trained-like BatchNorm statistics, not the identity
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("quant") / "small.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
    )
    return str(path)


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._items = iter(batches)

    def get_next(self):
        return next(self._items, None)


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qdq_model(request, float_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qdq") / f"small_qdq_{request.param}.onnx"
    quantize_static(
        float_model, str(path), _Reader(_batches(8)), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=request.param,
    )
    return str(path)


def _ort(path: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _precisions(engine: kiln.Engine) -> dict[str, str]:
    return {layer["name"]: layer["precision"] for layer in engine.layers}


def test_explicit_quantization_matches_onnxruntime(qdq_model):
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(qdq_model).graph.node)
    engine = kiln.build(qdq_model, device="cpu")
    layers = [layer for layer in engine.layers if "Quantized" in layer["op"]]
    # every Conv and Linear reads a quantized activation: 4 convolutions, 2 linears
    assert len(layers) == 6, _precisions(engine)
    assert {layer["precision"] for layer in layers} == {"int8"}
    feed = _batches(1, batch=64, seed=7)[0]
    ours = engine.run(feed)["logits"]
    theirs = _ort(qdq_model, feed)
    # ONNX Runtime also requantizes the values kiln keeps in float between its quantized layers
    # (the GELU's pieces, the pooled features): within a few steps of the output's own scale.
    step = _output_step(qdq_model, "logits")
    error = np.abs(ours - theirs)
    assert error.max() <= 3 * step, error.max() / step
    assert error.mean() <= 0.5 * step, error.mean() / step


def _output_step(path: str, output: str) -> float:
    model = onnx.load(path)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantize = next(n for n in model.graph.node if output in n.output)
    assert dequantize.op_type == "DequantizeLinear"
    return float(scales[dequantize.input[1]])


def test_explicit_quantization_is_not_applied_at_level_0(qdq_model):
    engine = kiln.build(qdq_model, device="cpu", opt_level=0)
    assert not any("Quantized" in layer["op"] for layer in engine.layers)
    feed = _batches(1, seed=3)[0]
    np.testing.assert_allclose(engine.run(feed)["logits"], _ort(qdq_model, feed), atol=1e-4)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_int8_calibrated_build_stays_close_to_fp32(float_model, method):
    fp32 = kiln.build(float_model, device="cpu")
    int8 = kiln.build(
        float_model, device="cpu", precision="int8", calibration_method=method,
        calibration_data=_batches(6),
    )
    precisions = _precisions(int8)
    # every Conv and Linear but the stem, whose 3 input channels stay in float
    assert sum(p == "int8" for p in precisions.values()) == 5, precisions
    assert precisions["/stem/stem.0/Conv"] == "fp32"
    assert int8.manifest["precision"] == "int8"
    feed = _batches(1, batch=16, seed=11)[0]
    reference = fp32.run(feed)["logits"]
    quantized = int8.run(feed)["logits"]
    assert _cosine(quantized, reference) > 0.99
    assert not np.allclose(quantized, reference, atol=1e-6)  # it really is quantized
    top1 = (quantized.argmax(1) == reference.argmax(1)).mean()
    assert top1 >= 0.8


def test_fp8_calibrated_build_on_cpu(float_model):
    fp32 = kiln.build(float_model, device="cpu")
    fp8 = kiln.build(float_model, device="cpu", precision="fp8", calibration_data=_batches(4))
    assert sum(p == "fp8" for p in _precisions(fp8).values()) == 5
    feed = _batches(1, batch=8, seed=5)[0]
    assert _cosine(fp8.run(feed)["logits"], fp32.run(feed)["logits"]) > 0.99


def test_calibration_cache_replaces_the_data(float_model, tmp_path):
    cache = tmp_path / "calibration.json"
    first = kiln.build(float_model, device="cpu", precision="int8", calibration_data=_batches(3),
                       calibration_cache=cache)
    assert cache.is_file()
    again = kiln.build(float_model, device="cpu", precision="int8", calibration_cache=cache)
    feed = _batches(1, seed=9)[0]
    np.testing.assert_array_equal(first.run(feed)["logits"], again.run(feed)["logits"])
    # another method's ranges are not reused: without data that is an error
    with pytest.raises(ConfigError, match="calibration data"):
        kiln.build(float_model, device="cpu", precision="int8", calibration_cache=cache,
                   calibration_method="minmax")


def test_int8_without_calibration_data_names_what_is_missing(float_model):
    with pytest.raises(ConfigError, match="precision int8 needs calibration data"):
        kiln.build(float_model, device="cpu", precision="int8")


def test_pinned_layer_stays_fp32(float_model):
    names = [layer["name"] for layer in kiln.build(
        float_model, device="cpu", precision="int8", calibration_data=_batches(2)).layers
        if layer["precision"] == "int8"]
    engine = kiln.build(float_model, device="cpu", precision="int8", calibration_data=_batches(2),
                        layer_precisions={names[0]: "fp32"})
    precisions = _precisions(engine)
    assert precisions[names[0]] == "fp32"
    assert sum(p == "int8" for p in precisions.values()) == len(names) - 1


def test_layer_pinned_to_fp16_stays_unquantized(float_model):
    layers = kiln.build(float_model, device="cpu", precision="int8", calibration_data=_batches(2)).layers
    quantized = [layer["name"] for layer in layers if layer["precision"] == "int8"]
    engine = kiln.build(float_model, device="cpu", precision="int8", calibration_data=_batches(2),
                        layer_precisions={quantized[-1]: "fp16"})
    pinned = next(layer for layer in engine.layers if layer["name"] == quantized[-1])
    assert pinned["op"] == "kiln::FusedMatMul"  # not QuantizedMatMul
    assert pinned["precision"] == "fp32"  # the CPU runs an int8 build's float layers in fp32
    assert sum(p == "int8" for p in _precisions(engine).values()) == len(quantized) - 1


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_fp16_pins_need_an_8_bit_or_fp16_policy(float_model, precision):
    with pytest.raises(ConfigError, match="pinned to fp16 under the int8, fp8, fp16 policies only"):
        kiln.build(float_model, device="cpu", precision=precision, layer_precisions={"head": "fp16"})


def test_bad_calibration_data_is_an_input_error(float_model):
    wrong_name = [{"image": np.zeros((1, 3, 16, 16), np.float32) + 1}]
    with pytest.raises(InputError, match="image"):
        kiln.build(float_model, device="cpu", precision="int8", calibration_data=wrong_name)
    wrong_dtype = [{"x": np.ones((1, 3, 16, 16), np.float64)}]
    with pytest.raises(InputError, match="float64"):
        kiln.build(float_model, device="cpu", precision="int8", calibration_data=wrong_dtype)
    with pytest.raises(InputError):
        kiln.build(float_model, device="cpu", precision="int8", calibration_data=[])


def test_int8_engine_survives_save_and_load(float_model, tmp_path):
    engine = kiln.build(float_model, device="cpu", precision="int8", calibration_data=_batches(2))
    path = tmp_path / "int8.kiln"
    engine.save(path)
    loaded = kiln.load(path)
    feed = _batches(1, seed=2)[0]
    np.testing.assert_array_equal(loaded.run(feed)["logits"], engine.run(feed)["logits"])
