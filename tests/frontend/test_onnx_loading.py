"""Loading ONNX models: the accepted forms and every refused one."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import ModelError, UnsupportedOpError
from kiln.frontend import load_onnx
from kiln.ops.registry import register
from tests.graphs import mlp, mlp_reference


def test_path_bytes_and_proto_all_load(tmp_path):
    model = mlp()
    onnx.save(model, tmp_path / "m.onnx")
    for source in (model, model.SerializeToString(), tmp_path / "m.onnx", str(tmp_path / "m.onnx")):
        assert [n.op_type for n in load_onnx(source).graph] == ["MatMul", "Add", "Relu", "Add"]


def test_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(ModelError, match="notes.onnx.*not .*ONNX model"):
        load_onnx(path)


def test_truncated_protobuf(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(mlp().SerializeToString()[:-37])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_onnx(path)


def test_directory_that_is_no_saved_model(tmp_path):
    with pytest.raises(ModelError, match="a directory, not an ONNX file"):
        load_onnx(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_onnx(tmp_path / "absent.onnx")


def test_invalid_graph_fails_the_checker():
    model = mlp()
    model.graph.node[1].input[0] = "never_defined"
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_onnx(model)


def test_opset_newer_than_onnx_knows():
    model = mlp(opset=onnx.defs.onnx_opset_version() + 1)
    with pytest.raises(ModelError, match="newer than"):
        load_onnx(model)


def _save_with_external_data(folder, location: str) -> str:
    model = mlp()
    for tensor in model.graph.initializer:
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=location)
        tensor.ClearField("raw_data")
    path = folder / "model.onnx"
    onnx.save(model, path)
    return str(path)


def test_external_data_inside_the_folder_loads(tmp_path):
    model = mlp()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    engine = kiln.build(tmp_path / "m.onnx", device="cpu")
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(engine.run({"x": x})["y"], mlp_reference(x)[0], rtol=1e-6)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 128)
    (tmp_path / "model" / "sub").mkdir(parents=True)
    path = _save_with_external_data(tmp_path / "model", location)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_onnx(path)


def test_absolute_external_data_location_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 128)
    path = _save_with_external_data(tmp_path, str(tmp_path / "secret.bin"))
    with pytest.raises(ModelError, match="relative"):
        load_onnx(path)


def test_external_data_through_a_symlink_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 128)
    (tmp_path / "model").mkdir()
    os.symlink(outside, tmp_path / "model" / "link")
    path = _save_with_external_data(tmp_path / "model", "link/w.bin")
    with pytest.raises(ModelError, match="symbolic link"):
        load_onnx(path)


def test_external_data_without_a_path_is_refused(tmp_path):
    model = onnx.load(_save_with_external_data(tmp_path, "w.bin"), load_external_data=False)
    with pytest.raises(ModelError, match="external data"):
        load_onnx(model.SerializeToString())


def test_unknown_op_names_node_op_and_domain():
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob_1", domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(UnsupportedOpError, match=r"'frob_1'.*com\.example::Frobnicate \(opset 1\)"):
        kiln.build(model, device="cpu")


def test_op_below_its_first_implemented_opset_lists_the_supported_ones():
    register("Twice", since=3, domain="test.kiln.frontend")(lambda x: x * 2)
    register("Twice", since=5, domain="test.kiln.frontend")(lambda x: x + x)
    node = helper.make_node("Twice", ["x"], ["y"], name="twice", domain="test.kiln.frontend")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.kiln.frontend", 2)]
    )
    with pytest.raises(UnsupportedOpError, match=r"'twice'.*Twice at opset 2.*from opset 3 .*3, 5"):
        kiln.build(model, device="cpu")
    model.opset_import[1].version = 4
    engine = kiln.build(model, device="cpu")
    np.testing.assert_array_equal(engine.run({"x": np.array([1.0, 2.0], np.float32)})["y"], [2.0, 4.0])
