"""Quantized layers handing their outputs over quantized (``HandOffQuantized``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import kiln
from tests.precision_graphs import batches, conv_chain


def _steps(engine: kiln.Engine) -> dict[str, dict]:
    return {step["name"]: step["attributes"] for step in engine.manifest["plan"]["steps"]}


def _build(model: onnx.ModelProto, **options) -> kiln.Engine:
    return kiln.build(model, device="cpu", precision="int8", calibration_method="minmax",
                      calibration_data=batches(3), **options)


def test_a_chain_hands_over_int8_and_computes_what_it_would_in_float():
    model = conv_chain(outlier_scale=1.0)
    engine = _build(model)
    steps = _steps(engine)
    assert steps["conv1"]["y_type"] == {"int": TensorProto.INT8}
    assert steps["conv1"]["y_scale"] == steps["conv2"]["x_scale"]
    assert steps["conv2"]["y_scale"] == steps["conv3"]["x_scale"]
    assert "y_type" not in steps["conv3"]  # the model's output stays float
    assert steps["conv3"]["float_type"] == {"int": TensorProto.FLOAT}
    # in float32 the quantized values are the same whichever layer quantizes them
    separate = _build(model, debug_outputs=True)
    assert not any("y_type" in attributes for attributes in _steps(separate).values())
    feed = batches(1, seed=5)[0]
    np.testing.assert_array_equal(engine.run(feed)["y"], separate.run(feed)["y"])


def test_values_read_elsewhere_stay_float():
    """conv1's output is also a model output; conv2's is also read by a float layer."""
    model = conv_chain(outlier_scale=1.0)
    graph = model.graph
    graph.output.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["n", 8, 8, 8]))
    graph.node.append(helper.make_node("Sigmoid", ["r2"], ["z"], name="float_reader"))
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8, 8, 8]))
    steps = _steps(_build(model))
    assert not any("y_type" in attributes for attributes in steps.values()), steps


def test_a_residual_is_handed_over_with_the_input_it_also_is():
    model = conv_chain(outlier_scale=1.0, residual=True)
    engine = _build(model)
    steps = _steps(engine)
    # conv1's output: conv2's input and the residual the last convolution adds, one int8 tensor
    readers = [attributes for attributes in steps.values() if "residual_scale" in attributes]
    assert len(readers) == 1
    assert readers[0]["residual_scale"] == steps["conv1"]["y_scale"] == steps["conv2"]["x_scale"]
    feed = batches(1, seed=5)[0]
    separate = _build(model, debug_outputs=True)  # every output float: the residual too
    ours, theirs = engine.run(feed)["y"].ravel(), separate.run(feed)["y"].ravel()
    assert ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)) > 0.9999
    assert not np.array_equal(ours, theirs)  # the residual really is the int8 one
