"""GroupPointwise: chains of elementwise ops become one kiln::Pointwise whose body runs them."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.fuse_pointwise import GroupPointwise, is_elementwise
from kiln.passes.rewrite import SOURCE_OPS_KEY, SOURCES_KEY

FLOAT = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(array, name) for name, array in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def group(proto: onnx.ModelProto):
    """The model after shape inference (as the pipeline runs it first) and GroupPointwise."""
    outcome = GroupPointwise()(load_onnx(onnx.shape_inference.infer_shapes(proto)))
    return outcome.model, outcome.changes


def pointwise_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == "kiln" and n.op_type == "Pointwise"]


def body_of(node: ir.Node) -> ir.Graph:
    return node.attributes["body"].value


def sources(node: ir.Node) -> list[str]:
    return json.loads(node.metadata_props[SOURCES_KEY])


def names(values: Sequence[ir.Value]) -> list[str]:
    return [v.name for v in values]


def random_inputs(proto: onnx.ModelProto, dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Random non-zero float inputs, symbolic dimensions set from ``dims``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        shape = [d.dim_value or dims[d.dim_param] for d in value.type.tensor_type.shape.dim]
        magnitude = rng.uniform(0.1, 1.5, shape)
        feeds[value.name] = (magnitude * rng.choice([-1.0, 1.0], shape)).astype(np.float32)
    return feeds


def assert_matches_ort(original: onnx.ModelProto, engine: kiln.Engine,
                       sizes: Sequence[dict[str, int]]) -> None:
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in original.graph.output]
    for seed, dims in enumerate(sizes):
        feeds = random_inputs(original, dims, seed)
        actual = engine.run(feeds)
        for name, expected in zip(output_names, session.run(None, feeds)):
            np.testing.assert_allclose(actual[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


def build(model: ir.Model) -> kiln.Engine:
    return kiln.build(ir.serde.serialize_model(model), device="cpu", opt_level=0)


# --- hand-built graphs ---------------------------------------------------------------------------

def chain() -> onnx.ModelProto:
    """y = relu(a * b + bias) * 0.5; bias (80 values) is large enough to stay an initializer."""
    bias = np.linspace(-1, 1, 80, dtype=np.float32)
    return make_model(
        [helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
         helper.make_node("Add", ["ab", "bias"], ["biased"], name="add"),
         helper.make_node("Relu", ["biased"], ["relu_out"], name="relu"),
         helper.make_node("Mul", ["relu_out", "half"], ["y"], name="scale")],
        [("a", ["n", 80]), ("b", ["n", 80])], [("y", ["n", 80])],
        [("bias", bias), ("half", np.array(0.5, np.float32))],
    )


def test_chain_becomes_one_pointwise_with_small_constants_inside():
    model, changes = group(chain())
    assert changes == {"groups": 1, "grouped_nodes": 4}
    (fused,) = list(model.graph)
    assert (fused.domain, fused.op_type) == ("kiln", "Pointwise")
    assert names(fused.inputs) == ["a", "b", "bias"]
    assert names(fused.outputs) == ["y"]
    assert sources(fused) == ["mul", "add", "relu", "scale"]
    body = body_of(fused)
    assert [n.op_type for n in body] == ["Constant", "Mul", "Add", "Relu", "Mul"]
    assert len(body.inputs) == 3 and len(body.outputs) == 1
    assert sorted(model.graph.initializers) == ["bias"]  # the scalar moved into the body


def test_chain_numbers():
    model, _ = group(chain())
    assert_matches_ort(chain(), build(model), [{"n": 1}, {"n": 5}])


def diamond() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Exp", ["x"], ["e"], name="exp"),
         helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
         helper.make_node("Add", ["e", "s"], ["y"], name="add")],
        [("x", ["n", 3])], [("y", ["n", 3])],
    )


def test_diamond_becomes_one_group():
    model, changes = group(diamond())
    assert changes == {"groups": 1, "grouped_nodes": 3}
    (fused,) = list(model.graph)
    assert names(fused.inputs) == ["x"] and names(fused.outputs) == ["y"]
    assert sources(fused) == ["exp", "sigmoid", "add"]
    assert_matches_ort(diamond(), build(model), [{"n": 2}, {"n": 7}])


def read_outside() -> onnx.ModelProto:
    """t = a * b feeds both the elementwise chain and a MatMul placed before the chain's end."""
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    return make_model(
        [helper.make_node("Mul", ["a", "b"], ["t"], name="mul"),
         helper.make_node("MatMul", ["t", "w"], ["m"], name="matmul"),
         helper.make_node("Add", ["t", "a"], ["u"], name="add"),
         helper.make_node("Relu", ["u"], ["y"], name="relu")],
        [("a", ["n", 4]), ("b", ["n", 4])], [("y", ["n", 4]), ("m", ["n", 4])], [("w", w)],
    )


def test_value_read_outside_becomes_a_second_output():
    model, changes = group(read_outside())
    assert changes == {"groups": 1, "grouped_nodes": 3}
    (fused,) = pointwise_nodes(model.graph)
    assert names(fused.inputs) == ["a", "b"]
    assert names(fused.outputs) == ["t", "y"]
    assert len(body_of(fused).outputs) == 2
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[0] is fused.outputs[0]
    assert [n.op_type for n in model.graph] == ["Pointwise", "MatMul"]  # re-sorted
    assert_matches_ort(read_outside(), build(model), [{"n": 1}, {"n": 6}])


def softmax_like() -> onnx.ModelProto:
    """exp -> ReduceSum -> div: Exp and Div are connected, but grouping them would make a cycle."""
    return make_model(
        [helper.make_node("Exp", ["x"], ["e"], name="exp"),
         helper.make_node("ReduceSum", ["e", "axes"], ["s"], name="sum", keepdims=1),
         helper.make_node("Div", ["e", "s"], ["d"], name="div"),
         helper.make_node("Mul", ["d", "two"], ["y"], name="double")],
        [("x", ["n", 4])], [("y", ["n", 4])],
        [("axes", np.array([-1], np.int64)), ("two", np.array(2.0, np.float32))],
    )


def test_path_through_other_node_is_not_grouped():
    model, changes = group(softmax_like())
    assert changes == {"groups": 1, "grouped_nodes": 2}
    assert [n.op_type for n in model.graph] == ["Exp", "ReduceSum", "Pointwise"]
    (fused,) = pointwise_nodes(model.graph)
    assert sources(fused) == ["div", "double"]
    assert names(fused.inputs) == ["e", "s"]
    assert_matches_ort(softmax_like(), build(model), [{"n": 1}, {"n": 3}])


def test_outputs_of_different_shapes_are_not_grouped():
    def broadcast(expose_exp: bool) -> onnx.ModelProto:
        outputs = [("y", ["n", 4])] + ([("e", ["n", 1])] if expose_exp else [])
        return make_model(
            [helper.make_node("Exp", ["x"], ["e"], name="exp"),
             helper.make_node("Add", ["e", "z"], ["y"], name="add")],
            [("x", ["n", 1]), ("z", ["n", 4])], outputs,
        )

    _, changes = group(broadcast(expose_exp=True))
    assert not changes  # a kernel would need two iteration spaces, [n, 1] and [n, 4]
    model, changes = group(broadcast(expose_exp=False))
    assert changes == {"groups": 1, "grouped_nodes": 2}
    assert_matches_ort(broadcast(False), build(model), [{"n": 2}, {"n": 5}])


def test_clip_with_bounds_from_an_input_is_not_grouped():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Clip", ["r", "low"], ["y"], name="clip")],
        [("x", ["n", 4]), ("low", [])], [("y", ["n", 4])],
    )
    _, changes = group(proto)
    assert not changes


def loop() -> onnx.ModelProto:
    """A Loop whose body computes acc = tanh(acc * 0.9 + x), with x from the enclosing graph."""
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["decay"], name="decay",
                          value=numpy_helper.from_array(np.array(0.9, np.float32))),
         helper.make_node("Mul", ["acc", "decay"], ["scaled"], name="mul"),
         helper.make_node("Add", ["scaled", "x"], ["summed"], name="add"),
         helper.make_node("Tanh", ["summed"], ["acc_out"], name="tanh"),
         helper.make_node("Identity", ["cond"], ["cond_out"], name="keep_going")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", FLOAT, None)],
    )
    return make_model(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=body)],
        [("x", ["n", 4])], [("y", ["n", 4])],
        [("trips", np.array(3, np.int64)), ("go", np.array(True))],
    )


def test_group_inside_loop_body():
    model, changes = group(loop())
    assert changes == {"groups": 1, "grouped_nodes": 3}
    (loop_node,) = list(model.graph)
    body = loop_node.attributes["body"].value
    assert [n.op_type for n in body] == ["Pointwise", "Identity"]  # the Constant moved inside
    (fused,) = pointwise_nodes(body)
    assert sources(fused) == ["mul", "add", "tanh"]
    assert names(fused.inputs) == ["acc", "x"]
    assert fused.outputs[0] in body.outputs
    assert_matches_ort(loop(), build(model), [{"n": 1}, {"n": 4}])


def gated(activation: str) -> onnx.ModelProto:
    """clip(sigmoid(x) * x, -0.5, 0.5), the sigmoid an ONNX op or, as an earlier fusion leaves
    it, a kiln::Activation."""
    act = (helper.make_node("Activation", ["x"], ["a"], name="act", domain="kiln",
                            activation="Sigmoid")
           if activation == "kiln" else helper.make_node("Sigmoid", ["x"], ["a"], name="act"))
    proto = make_model(
        [act,
         helper.make_node("Mul", ["a", "x"], ["m"], name="mul"),
         helper.make_node("Clip", ["m", "low", "high"], ["y"], name="clip")],
        [("x", ["n", 4])], [("y", ["n", 4])],
        [("low", np.array(-0.5, np.float32)), ("high", np.array(0.5, np.float32))],
    )
    if activation == "kiln":
        proto.opset_import.append(helper.make_opsetid("kiln", 1))
    return proto


def test_kiln_activation_joins_a_group():
    model = load_onnx(onnx.shape_inference.infer_shapes(gated("kiln")))
    model.graph[0].metadata_props[SOURCES_KEY] = json.dumps(["sigmoid_from_onnx"])
    model.graph[0].metadata_props[SOURCE_OPS_KEY] = json.dumps(["Sigmoid"])
    outcome = GroupPointwise()(model)
    assert outcome.changes == {"groups": 1, "grouped_nodes": 3}
    (fused,) = list(outcome.model.graph)
    assert sources(fused) == ["sigmoid_from_onnx", "mul", "clip"]
    body_ops = [n.op_type for n in body_of(fused)]
    assert body_ops == ["Constant", "Constant", "Activation", "Mul", "Clip"]
    assert_matches_ort(gated("onnx"), build(outcome.model), [{"n": 1}, {"n": 6}])


def test_grouping_twice_changes_nothing_more():
    model, _ = group(chain())
    outcome = GroupPointwise()(model)
    assert not outcome.changes
    (fused,) = list(outcome.model.graph)
    assert [n.op_type for n in body_of(fused)] == ["Constant", "Mul", "Add", "Relu", "Mul"]


def test_single_elementwise_nodes_stay():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("ReduceSum", ["r", "axes"], ["y"], name="sum", keepdims=1)],
        [("x", ["n", 4])], [("y", ["n", 1])], [("axes", np.array([-1], np.int64))],
    )
    model, changes = group(proto)
    assert not changes
    assert [n.op_type for n in model.graph] == ["Relu", "ReduceSum"]


# --- a model exported from torch -----------------------------------------------------------------

class GeluResidual(nn.Module):
    """A tanh-GELU written out, an ONNX Gelu, a sigmoid gate and a residual around a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        g = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))
        return x + F.gelu(g, approximate="tanh") * torch.sigmoid(h)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "optimized"])
def exported(request) -> onnx.ModelProto:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            GeluResidual().eval(), (torch.randn(2, 8),), dynamo=True, input_names=["x"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
            optimize=request.param, verbose=False,
        )
    return program.model_proto


def test_exported_chain_and_residual_become_one_group(exported):
    original = load_onnx(exported)
    elementwise = [n.name for n in original.graph if is_elementwise(n)]
    model, changes = group(exported)
    assert changes == {"groups": 1, "grouped_nodes": len(elementwise)}
    (fused,) = pointwise_nodes(model.graph)
    assert sources(fused) == elementwise
    assert len(fused.inputs) == 2 and model.graph.inputs[0] in fused.inputs  # x and fc(x)
    assert names(fused.outputs) == [exported.graph.output[0].name]
    assert not any(is_elementwise(n) for n in model.graph)
    assert_matches_ort(exported, build(model), [{"batch": 1}, {"batch": 9}])


def test_engine_round_trip(exported):
    model, _ = group(exported)
    engine = kiln.runtime.from_bytes(build(model).to_bytes())
    (layer,) = [layer for layer in engine.layers if layer["op"] == "kiln::Pointwise"]
    assert layer["sources"] == sources(pointwise_nodes(model.graph)[0])
    assert_matches_ort(exported, engine, [{"batch": 3}, {"batch": 5}])
