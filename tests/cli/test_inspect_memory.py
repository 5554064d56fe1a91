"""``kiln inspect`` shows the static memory plan: arena against the sum of the activations."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from kiln.cli.main import main
from kiln.engine import format as engine_format
from kiln.engine.format import EngineData

SIZE = 64 * 64 * 4  # bytes of one [1, 64, 64] float32 value


@pytest.fixture
def engine_file(tmp_path):
    """x -> a -> b -> y at a fixed shape, unfused: three activations, two alive at a time."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="r1"),
             helper.make_node("Relu", ["b"], ["y"], name="r2")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "chain.onnx")
    path = tmp_path / "chain.kiln"
    argv = ["build", str(tmp_path / "chain.onnx"), "-o", str(path), "--device", "cpu", "--opt-level", "1"]
    assert main([*argv, "--quiet"]) == 0
    return path


def test_inspect_prints_the_memory_line(engine_file, capsys):
    capsys.readouterr()
    assert main(["inspect", str(engine_file)]) == 0
    out = capsys.readouterr().out
    assert "memory: arena 32.0 KiB for 3 activations totalling 48.0 KiB (1.5x reuse), 0 dynamic" in out


def test_inspect_json_has_the_memory_summary(engine_file, capsys):
    capsys.readouterr()
    assert main(["inspect", str(engine_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memory"] == {
        "arena_bytes": 2 * SIZE, "activation_bytes": 3 * SIZE, "activations": 3, "dynamic_values": 0,
    }


def test_engines_without_a_memory_plan_still_inspect(engine_file, tmp_path, capsys):
    data = engine_format.load(engine_file)
    manifest = {key: value for key, value in data.manifest.items() if key != "memory"}
    old = tmp_path / "old.kiln"
    engine_format.save(EngineData(manifest=manifest, tensors=data.tensors), old)
    capsys.readouterr()
    assert main(["inspect", str(old)]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "memory:" not in out
    assert main(["inspect", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"] is None
