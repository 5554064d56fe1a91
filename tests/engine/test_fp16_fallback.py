"""int8/fp8 builds on a GPU keep in fp16 the quantized layers that run faster there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln import fp16_fallback
from kiln.config import BuildConfig
from kiln.errors import BuildError
from kiln.fp16_fallback import MANIFEST_KEY, applies, fp16_faster_layers

LAYERS = [
    {"name": "qkv", "op": "kiln::QuantizedMatMul"},
    {"name": "attention", "op": "kiln::Attention"},
    {"name": "out", "op": "kiln::QuantizedMatMul"},
    {"name": "conv", "op": "kiln::QuantizedConv"},
    {"name": "norm", "op": "kiln::LayerNorm"},
]


def test_quantized_layers_at_least_a_margin_faster_in_fp16_are_chosen():
    int8 = {"qkv": 0.040, "attention": 0.05, "out": 0.030, "conv": 0.020, "norm": 0.02}
    fp16 = {"qkv": 0.038, "attention": 0.01, "out": 0.018, "conv": 0.010, "norm": 0.01}
    # qkv is only 5% faster in fp16 (noise); attention and norm are not quantized layers
    assert fp16_faster_layers(LAYERS, int8, fp16) == ["out", "conv"]


def test_layers_timed_in_one_engine_only_stay():
    # a layer the fp16 build fused into another has no time of its own there
    assert fp16_faster_layers(LAYERS, {"out": 0.03, "conv": 0.02}, {"conv": 0.001}) == ["conv"]


@pytest.mark.parametrize("options, expected", [
    ({"precision": "int8", "device": "cuda"}, True),
    ({"precision": "fp8", "device": "cuda"}, True),
    ({"precision": "int8", "device": "cpu"}, False),  # no kernel timings on the CPU
    ({"precision": "fp16", "device": "cuda"}, False),
    ({"precision": "int8", "device": "cuda", "opt_level": 2}, False),
    ({"precision": "int8", "device": "cuda", "accuracy_budget": "cosine>=0.99"}, False),
    ({"precision": "int8", "device": "cuda", "fp16_fallback": False}, False),
])
def test_applies_to_8_bit_builds_on_a_gpu(options, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the decision, GPU or not
    assert applies(BuildConfig(**options)) is expected


class FeedForward(nn.Module):
    """A transformer's feed-forward block over 4096 tokens: products of many rows."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 1024)
        self.down = nn.Linear(1024, 256)
        self.norm = nn.LayerNorm(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(nn.functional.gelu(self.up(x))))


@pytest.mark.gpu
def test_int8_build_on_a_gpu_compares_its_layers_with_fp16(tmp_path):
    torch.manual_seed(0)
    model = FeedForward().eval()
    path = tmp_path / "ffn.onnx"
    torch.onnx.export(model, (torch.randn(4096, 256),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False, opset_version=17)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4096, 256)).astype(np.float32)} for _ in range(2)]
    engine = kiln.build(path, device="cuda", precision="int8", calibration_data=batches)
    record = engine.manifest["build"][MANIFEST_KEY]
    precisions = {layer["name"]: layer["precision"] for layer in engine.layers}
    for name, ms in record["layers"].items():
        assert ms["fp16"] < 0.9 * ms["int8"]
        assert precisions[name] == ("fp16" if record["kept"] else "int8")
    if record["layers"]:
        assert record["kept"] == (record["run_ms"]["with_fp16"] < 0.98 * record["run_ms"]["as_built"])
    x = rng.standard_normal((4096, 256)).astype(np.float32)
    got = engine.run({"x": x})["y"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    cosine = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() > 0.99


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fallback") / "ffn.onnx"
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    torch.onnx.export(model.eval(), (torch.randn(32, 16),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False, opset_version=17)
    return str(path)


def _batches():
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(2)]


def test_the_comparison_runs_end_to_end(small_model):
    # on the CPU only to exercise it (the build applies it on GPUs): fp16 layers run in fp32 here
    data = fp16_fallback.build_with_fp16_fallback(
        small_model, BuildConfig(device="cpu", precision="int8"), None, _batches())
    record = data.manifest["build"][MANIFEST_KEY]
    precisions = {layer["name"]: layer["precision"] for layer in data.manifest["layers"]}
    for name, ms in record["layers"].items():
        assert ms["fp16"] < 0.9 * ms["int8"]
        assert precisions[name] == ("fp32" if record["kept"] else "int8")
    assert "int8" in precisions.values() or record.get("kept")


def test_a_failed_comparison_leaves_the_8_bit_engine(small_model, monkeypatch):
    build = fp16_fallback.build_engine

    def fp16_fails(model, config, *args):
        if config.precision == "fp16":
            raise BuildError("no fp16 here")
        return build(model, config, *args)

    monkeypatch.setattr(fp16_fallback, "build_engine", fp16_fails)
    data = fp16_fallback.build_with_fp16_fallback(
        small_model, BuildConfig(device="cpu", precision="int8"), None, _batches())
    assert data.manifest["build"][MANIFEST_KEY] == {"error": "no fp16 here"}
    assert "int8" in {layer["precision"] for layer in data.manifest["layers"]}
