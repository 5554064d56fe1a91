"""Small ONNX graphs built by hand for unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(opset: int = 17) -> onnx.ModelProto:
    """y = relu(x @ w + b) + x, with a symbolic batch dimension; also outputs relu(...)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["xwb"], name="bias"),
        helper.make_node("Relu", ["xwb"], ["hidden"], name="relu"),
        helper.make_node("Add", ["hidden", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 4])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def two_inputs() -> onnx.ModelProto:
    """z = a * b + 1 with shapes [n, 3] and [n, 3], a float and b float."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "one"], ["z"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
        [one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = mlp()
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    hidden = np.maximum(x @ w + b, 0)
    return hidden + x, hidden
