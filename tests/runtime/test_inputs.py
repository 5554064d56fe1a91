"""Engine.run: what it accepts, what it returns, and how it refuses wrong inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import InputError
from tests.graphs import mlp, mlp_reference, two_inputs


@pytest.fixture(scope="module")
def mlp_engine():
    return kiln.build(mlp(), device="cpu")


@pytest.fixture(scope="module")
def pair_engine():
    return kiln.build(two_inputs(), device="cpu")


def test_signature(mlp_engine):
    assert [(i.name, i.dtype, i.shape) for i in mlp_engine.inputs] == [("x", "float32", ("batch", 4))]
    assert [o.name for o in mlp_engine.outputs] == ["y", "hidden"]


def test_numpy_in_numpy_out(mlp_engine):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = mlp_engine.run({"x": x})
    assert all(isinstance(v, np.ndarray) for v in out.values())
    np.testing.assert_allclose(out["y"], mlp_reference(x)[0], rtol=1e-6)


def test_torch_in_torch_out(mlp_engine):
    x = torch.randn(2, 4)
    out = mlp_engine.run({"x": x})
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    np.testing.assert_allclose(out["y"].numpy(), mlp_reference(x.numpy())[0], rtol=1e-6)


def test_numpy_scalars_are_accepted():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "scalars",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [])],
    )
    engine = kiln.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), device="cpu")
    out = engine.run({"a": np.float32(1.5), "b": np.array(2.0, np.float32)})
    assert out["c"].shape == () and out["c"] == np.float32(3.5)


def test_missing_input(pair_engine):
    with pytest.raises(InputError, match="missing input 'b'.*a: float32\\[nx3\\]"):
        pair_engine.run({"a": np.ones((1, 3), np.float32)})


def test_misspelled_input_gets_a_suggestion(mlp_engine):
    with pytest.raises(InputError, match="unknown input 'X'.*did you mean 'x'"):
        mlp_engine.run({"X": np.ones((1, 4), np.float32)})


def test_extra_input(mlp_engine):
    with pytest.raises(InputError, match="unknown input 'mask'"):
        mlp_engine.run({"x": np.ones((1, 4), np.float32), "mask": np.ones(1)})


def test_wrong_dtype(mlp_engine):
    with pytest.raises(InputError, match="'x' has dtype float64, the engine expects float32"):
        mlp_engine.run({"x": np.ones((1, 4))})


def test_wrong_torch_dtype(mlp_engine):
    with pytest.raises(InputError, match="'x' has dtype int64"):
        mlp_engine.run({"x": torch.ones(1, 4, dtype=torch.int64)})


def test_wrong_rank(mlp_engine):
    with pytest.raises(InputError, match="rank 3 .*expects rank 2"):
        mlp_engine.run({"x": np.ones((1, 1, 4), np.float32)})


def test_dimension_contradicting_a_static_one(mlp_engine):
    with pytest.raises(InputError, match="size 5 in dimension 1, the engine expects 4"):
        mlp_engine.run({"x": np.ones((2, 5), np.float32)})


def test_symbolic_dimension_must_agree_across_inputs(pair_engine):
    with pytest.raises(InputError, match="dimension 'n' is 2 in input 'a' but 3 in input 'b'"):
        pair_engine.run({"a": np.ones((2, 3), np.float32), "b": np.ones((3, 3), np.float32)})


def test_not_a_mapping(mlp_engine):
    with pytest.raises(InputError, match="mapping"):
        mlp_engine.run([np.ones((1, 4), np.float32)])
