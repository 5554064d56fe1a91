"""kiln compare: per-output errors, pass/fail exit codes, and the first divergent layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.cli.main import main
from kiln.runtime.accuracy import agreement
from tests.cli.test_bench import TORCH_MLP
from tests.graphs import mlp

LAYERS = 5
CHANGED = 3  # the layer whose weights the model loses after the engine was built


def deep_mlp() -> onnx.ModelProto:
    """x -> (MatMul, Add, Tanh) x 5; Tanh keeps a changed weight's effect visible downstream."""
    rng = np.random.default_rng(1)
    nodes, weights, value = [], [], "x"
    for i in range(LAYERS):
        weights += [
            numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) / 3, f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [value, f"w{i}"], [f"mm{i}"], name=f"matmul_{i}"),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"pre{i}"], name=f"bias_{i}"),
            helper.make_node("Tanh", [f"pre{i}"], [f"act{i}"], name=f"tanh_{i}"),
        ]
        value = f"act{i}"
    graph = helper.make_graph(
        nodes, "deep_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["batch", 8])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "deep.onnx"
    onnx.save(deep_mlp(), path)
    return path


@pytest.fixture
def debug_engine(tmp_path, model_file):
    path = tmp_path / "deep.kiln"
    assert main(["build", str(model_file), "-o", str(path), "--device", "cpu", "--debug-outputs", "-q"]) == 0
    return path


@pytest.fixture
def changed_model(tmp_path):
    """The model with the weights of layer CHANGED perturbed."""
    model = deep_mlp()
    weight = next(t for t in model.graph.initializer if t.name == f"w{CHANGED}")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    path = tmp_path / "changed.onnx"
    onnx.save(model, path)
    return path


def _compare(capsys, *args: str) -> tuple[int, dict]:
    code = main(["compare", *args, "--json", "--shapes", "x:4x8"])
    return code, json.loads(capsys.readouterr().out)


def test_same_model_passes(model_file, capsys):
    code, report = _compare(capsys, str(model_file), "--vs", "onnxruntime", "--device", "cpu")
    assert code == 0 and report["passed"] and report["first_divergent"] is None
    [output] = report["outputs"]
    assert output["name"] == f"act{LAYERS - 1}" and output["passed"]
    assert output["max_abs"] < 1e-5 and output["cosine"] == pytest.approx(1.0)


def test_layerwise_names_the_layer_whose_weights_changed(changed_model, debug_engine, capsys):
    code, report = _compare(
        capsys, str(changed_model), "--engine", str(debug_engine), "--vs", "onnxruntime", "--layerwise"
    )
    assert code == 1 and not report["passed"] and not report["outputs"][0]["passed"]
    divergent = report["first_divergent"]
    # Every earlier layer agrees: the divergence starts where w3 is read (fused or not).
    assert f"matmul_{CHANGED}" in divergent["sources"]
    assert set(divergent["sources"]) <= {f"matmul_{CHANGED}", f"bias_{CHANGED}", f"tanh_{CHANGED}"}
    assert divergent["tensor"] in {f"mm{CHANGED}", f"pre{CHANGED}", f"act{CHANGED}"}
    assert divergent["error"]["max_abs"] > 1e-3 and divergent["error"]["cosine"] < 1


def test_layerwise_on_a_healthy_build_finds_nothing(model_file, capsys):
    for reference in ("onnxruntime", "fp32"):
        code, report = _compare(capsys, str(model_file), "--vs", reference, "--layerwise", "--device", "cpu")
        assert code == 0 and report["first_divergent"] is None, reference


def test_human_report_names_the_layer(changed_model, debug_engine, capsys):
    code = main(["compare", str(changed_model), "--engine", str(debug_engine), "--vs", "onnxruntime", "--layerwise"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and f"matmul_{CHANGED}" in out


def test_vs_torch_module(tmp_path, capsys):
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), model)
    module = tmp_path / "mlp_module.py"
    module.write_text(TORCH_MLP)
    code = main(["compare", str(model), "--vs", "torch", "--torch-module", f"{module}:make", "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [o["name"] for o in report["outputs"]] == ["y", "hidden"]


def test_given_input_file(model_file, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    code, report = _compare(capsys, str(model_file), "--vs", "onnxruntime", "--input", f"x={tmp_path / 'x.npy'}")
    assert code == 0 and report["passed"]


def test_layerwise_needs_an_engine_with_debug_outputs(model_file, tmp_path, capsys):
    engine = tmp_path / "plain.kiln"
    assert main(["build", str(model_file), "-o", str(engine), "--device", "cpu", "-q"]) == 0
    code = main(["compare", str(model_file), "--engine", str(engine), "--vs", "onnxruntime", "--layerwise"])
    assert code == 1 and "--debug-outputs" in capsys.readouterr().err


def test_torch_without_module_is_a_usage_error(model_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(model_file), "--vs", "torch"])
    assert exit_info.value.code == 2


def test_agreement_counts_matching_nans_and_flags_shapes():
    nan = np.array([1.0, np.nan, np.inf], np.float32)
    same = agreement(nan, nan.copy(), atol=0, rtol=0)
    assert same.passed and same.max_abs == 0
    assert not agreement(np.array([1.0, np.nan]), np.array([1.0, 2.0]), 1e-5, 1e-5).passed
    mismatch = agreement(np.zeros((2, 3)), np.zeros((3, 2)), 1e-5, 1e-5)
    assert not mismatch.passed and "shape" in mismatch.note
    off = agreement(np.array([1.1, 2.0]), np.array([1.0, 2.0]), atol=0, rtol=0.2)
    assert off.passed and off.max_abs == pytest.approx(0.1) and off.max_rel == pytest.approx(0.1)
