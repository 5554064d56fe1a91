"""Precision policies: fp16/bf16 builds match fp32 ONNX Runtime, store reduced weights and keep
the signature; pinned layers stay fp32; tf32 builds run; bad options are ConfigErrors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.cli.main import main
from kiln.engine import format as engine_format
from kiln.errors import ConfigError
from tests.graphs import mlp
from tests.models import zoo

TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2}
REDUCED_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    path = zoo.export(zoo.ResNet().eval(), (torch.randn(2, 3, 32, 32),),
                      tmp_path_factory.mktemp("resnet") / "resnet.onnx", ["image"],
                      {"image": {0: "batch"}})
    rng = np.random.default_rng(0)
    return path, {"image": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = zoo.export(zoo.BertEncoder().eval(), (ids, mask),
                      tmp_path_factory.mktemp("bert") / "bert.onnx", ["input_ids", "attention_mask"],
                      {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
    mask = np.ones((2, 16), np.int64)
    mask[1, 12:] = 0  # some padding, so the mask matters
    return path, {"input_ids": ids.numpy(), "attention_mask": mask}


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    path.write_bytes(mlp().SerializeToString())
    return path, {"x": np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)}


def _reference(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check_close(outputs, references, tolerance):
    for output, reference in zip(outputs, references):
        output = np.asarray(output, np.float64).reshape(-1)
        reference = np.asarray(reference, np.float64).reshape(-1)
        relative = np.abs(output - reference).max() / max(np.abs(reference).max(), 1e-12)
        cosine = output @ reference / (np.linalg.norm(output) * np.linalg.norm(reference))
        assert relative <= tolerance, relative
        assert cosine >= 0.999, cosine


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["mlp_model", "resnet", "bert"])
def test_reduced_build_matches_fp32_reference(model, precision, request):
    path, feeds = request.getfixturevalue(model)
    engine = kiln.build(str(path), device="cpu", precision=precision)
    outputs = engine.run(feeds)
    _check_close(list(outputs.values()), _reference(path, feeds), TOLERANCE[precision])
    assert engine.manifest["precision"] == precision
    # the signature is fp32's
    fp32 = kiln.build(str(path), device="cpu")
    assert engine.manifest["signature"] == fp32.manifest["signature"]
    assert all(o.dtype == r.dtype for o, r in zip(outputs.values(), fp32.run(feeds).values()))
    # the weights are stored in the reduced type, and most layers compute in it
    stored = engine_format.loads(engine.to_bytes()).tensors
    weights = engine.manifest["plan"]["weights"].values()  # top level: subgraph bodies stay fp32
    floats = [stored[key] for key in weights if key in stored and stored[key].is_floating_point()]
    assert floats and all(t.dtype == REDUCED_DTYPE[precision] for t in floats)
    reduced = [layer for layer in engine.layers if layer["precision"] == precision]
    assert len(reduced) > len(engine.layers) // 2


@pytest.mark.parametrize("opt_level", [0, 1])
def test_lower_levels_reduce_too(mlp_model, opt_level):
    path, feeds = mlp_model
    engine = kiln.build(str(path), device="cpu", precision="fp16", opt_level=opt_level)
    _check_close(list(engine.run(feeds).values()), _reference(path, feeds), TOLERANCE["fp16"])
    assert {layer["name"]: layer["precision"] for layer in engine.layers}["matmul"] == "fp16"


def test_pinned_layer_is_fp32(mlp_model, tmp_path, capsys):
    path, feeds = mlp_model
    engine_file = tmp_path / "mlp.kiln"
    args = ["build", str(path), "-o", str(engine_file), "--device", "cpu", "-q",
            "--precision", "fp16", "--layer-precision", "matmul=fp32"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(engine_file), "--json"]) == 0
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["matmul"]["precision"] == "fp32"
    assert layers["residual"]["precision"] == "fp16"
    # it computes in fp32: its plan step reads and writes float32, and its weights stayed fp32
    step = next(s for s in kiln.load(engine_file).manifest["plan"]["steps"] if s["name"] == "matmul")
    assert set(step["input_types"]) | set(step["output_types"]) == {1}  # ONNX FLOAT
    stored = engine_format.load(engine_file).tensors
    assert all(t.dtype == torch.float32 for t in stored.values())
    _check_close(list(kiln.load(engine_file).run(feeds).values()), _reference(path, feeds), 1e-2)


def test_tf32_builds_and_runs(mlp_model, tmp_path):
    path, feeds = mlp_model
    engine_file = tmp_path / "mlp.kiln"
    assert main(["build", str(path), "-o", str(engine_file), "--device", "cpu", "-q",
                 "--precision", "tf32"]) == 0
    engine = kiln.load(engine_file)
    assert engine.manifest["precision"] == "tf32"
    assert {layer["precision"] for layer in engine.layers} == {"tf32"}
    _check_close(list(engine.run(feeds).values()), _reference(path, feeds), 1e-5)
    assert torch.get_float32_matmul_precision() == "highest"  # restored after the run


def test_invalid_precision_is_a_config_error(mlp_model, tmp_path, capsys):
    with pytest.raises(ConfigError, match="fp32, tf32, fp16, bf16, int8, fp8, best, not 'fp12'"):
        kiln.BuildConfig(precision="fp12")
    with pytest.raises(ConfigError, match="pinned"):
        kiln.BuildConfig(layer_precisions={"matmul": "fp16"})
    path, _ = mlp_model
    args = ["build", str(path), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "-q"]
    assert main([*args, "--precision", "fp12"]) == 1
    err = capsys.readouterr().err.strip()
    assert "fp12" in err and "\n" not in err


def test_unknown_layer_is_a_config_error(mlp_model, tmp_path, capsys):
    path, _ = mlp_model
    with pytest.raises(ConfigError, match="'no_such_layer'"):
        kiln.build(str(path), device="cpu", precision="bf16", layer_precisions={"no_such_layer": "fp32"})
    args = ["build", str(path), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "-q",
            "--precision", "fp16", "--layer-precision", "nope=fp32"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "'nope'" in err and "\n" not in err


@pytest.mark.gpu
def test_fp16_resnet_on_cuda(resnet):
    path, feeds = resnet
    fp32 = kiln.build(str(path), device="cuda").run(feeds)
    fp16 = kiln.build(str(path), device="cuda", precision="fp16")
    assert all(t.dtype == torch.float16 for t in fp16._data.tensors.values() if t.is_floating_point())
    _check_close(list(fp16.run(feeds).values()), list(fp32.values()), 1e-2)
