"""merge_products: products of one input by constant weights -> one FusedMatMul and a Split."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.fuse_matmul import fuse_matmul
from kiln.passes.merge_products import MergeSiblingProducts
from tests.passes.matmul_norm_common import apply, assert_matches_ort, ops

K = 8
SIZES = [{"batch": 2, "seq": 3}, {"batch": 1, "seq": 5}]
RNG = np.random.default_rng(0)


def _projections(widths, *, biases=True, activations=None, opset=18, extra_outputs=()):
    """x -> one MatMul (+ bias Add, + activation) per width, each an output."""
    nodes, weights, outputs = [], [], []
    for i, width in enumerate(widths):
        weights.append(numpy_helper.from_array(RNG.standard_normal((K, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"proj{i}"))
        last = f"p{i}"
        if biases:
            weights.append(numpy_helper.from_array(RNG.standard_normal(width).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [last, f"b{i}"], [f"a{i}"]))
            last = f"a{i}"
        if activations and activations[i]:
            nodes.append(helper.make_node(activations[i], [last], [f"act{i}"]))
            last = f"act{i}"
        nodes.append(helper.make_node("Mul", [last, last], [f"y{i}"]))  # a reader after the product
        outputs.append(f"y{i}")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in [*outputs, *extra_outputs]],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _merged(proto, pinned=()):
    fused, _ = apply(fuse_matmul(), proto)
    outcome = MergeSiblingProducts(pinned)(fused)
    return outcome.model, outcome.changes


@pytest.mark.parametrize("biases", [True, False])
def test_query_key_value_projections_become_one_product(biases):
    original = _projections([16, 16, 8], biases=biases)
    model, changes = _merged(original)
    assert changes == {"MergedProducts": 3}
    assert ops(model)[:2] == ["kiln::FusedMatMul", "Split"] and ops(model).count("kiln::FusedMatMul") == 1
    # The product keeps a shape: its readers' specs are timed at the tuner's concrete shapes.
    assert list(model.graph.node(0).outputs[0].shape) == ["batch", "seq", 40]
    assert_matches_ort(model, original, SIZES)


def test_different_epilogues_stay_apart():
    original = _projections([16, 16, 16], activations=["Relu", None, "Relu"])
    model, changes = _merged(original)
    assert changes == {"MergedProducts": 2}  # the two with Relu
    assert ops(model).count("kiln::FusedMatMul") == 2
    assert_matches_ort(model, original, SIZES)


def test_pinned_layers_and_graph_outputs_stay_apart():
    original = _projections([16, 16, 16], extra_outputs=["a2"])
    fused, _ = apply(fuse_matmul(), original)
    names = [n.name for n in fused.graph if n.op_type == "FusedMatMul"]
    outcome = MergeSiblingProducts(pinned=[names[0]])(fused)
    assert outcome.changes == {}  # one pinned, one a graph output: one product left to merge
    assert_matches_ort(outcome.model, original, SIZES)


def test_models_before_opset_13_are_left_alone():
    model, changes = _merged(_projections([16, 16], opset=12))
    assert changes == {} and ops(model).count("kiln::FusedMatMul") == 2
