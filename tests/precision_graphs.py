"""ONNX graphs with a layer planted to lose accuracy in reduced precision, and data for them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SENSITIVE = "conv2"


def conv_chain(outlier_scale: float, residual: bool = False) -> onnx.ModelProto:
    """x [n, 8, 8, 8] -> conv1 -> relu -> conv2 -> relu -> conv3 -> y (with ``residual``: conv3
    makes 8 channels and y = relu(conv3 + conv1's relu)).

    conv1's channel 0 comes out ``outlier_scale`` times larger and conv2 reads that channel with
    weights as much smaller, so the fp32 result is that of three ordinary convolutions. But
    conv2's input spans a range that one per-tensor int8 scale cannot resolve (scale 1000: its
    other channels round to 0), and with a scale of 2e4 conv1's output leaves fp16's range while
    every weight stays within it.
    """
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    out_channels = 8 if residual else 4
    w3 = (rng.standard_normal((out_channels, 8, 3, 3)) * 0.2).astype(np.float32)
    w1[0] *= outlier_scale
    w2[:, 0] /= outlier_scale
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=pads),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3" if residual else "y"], name="conv3", pads=pads),
    ]
    if residual:
        nodes += [helper.make_node("Add", ["c3", "r1"], ["sum"], name="add"),
                  helper.make_node("Relu", ["sum"], ["y"], name="relu3")]
    graph = helper.make_graph(
        nodes, "conv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_channels, 8, 8])],
        [numpy_helper.from_array(w, name) for w, name in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    # IR version 10: what every ONNX Runtime of opset 17's time loads, whatever onnx writes by default
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def batches(count: int, seed: int = 0, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 8, 8, 8)).astype(np.float32)} for _ in range(count)]
