"""fuse_matmul: Gemm and MatMul with bias, activation and residual -> kiln::FusedMatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kiln.passes.fuse_matmul import fuse_matmul
from tests.graphs import mlp
from tests.passes.matmul_norm_common import (
    apply,
    assert_matches_ort,
    attributes,
    export,
    node,
    ops,
)

K, N = 8, 16
SIZES = [{"batch": 2, "seq": 3}, {"batch": 3, "seq": 5}]
RNG = np.random.default_rng(0)
W = numpy_helper.from_array(RNG.standard_normal((K, N)).astype(np.float32), "w")
W_NK = numpy_helper.from_array(RNG.standard_normal((N, K)).astype(np.float32), "w_nk")


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _model(nodes, initializers, inputs: dict[str, list], outputs: list[str], opset: int = 20,
           dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph with its intermediate shapes inferred, as kiln's shape pass provides them."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, dtype, None) for o in outputs], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _kiln_variant(reference: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``reference`` (shapes inferred) computed by ``nodes`` instead, which use kiln ops."""
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    produced = {o for n in nodes for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    model.opset_import.append(helper.make_opsetid("kiln", 1))
    return model


def _matmul(a: str, b: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], ["xw"])


def _linear(*epilogue: onnx.NodeProto, bias_first: bool = False, extra=(), inputs=None,
            opset: int = 20) -> onnx.ModelProto:
    """x[batch, seq, K] @ w + b -> "y", then ``epilogue`` writing "out"; r is [batch, seq, N]."""
    add = ["b", "xw"] if bias_first else ["xw", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
             helper.make_node("Add", add, ["y"], name="bias"), *epilogue]
    inputs = inputs or {"x": ["batch", "seq", K], "r": ["batch", "seq", N]}
    return _model(nodes, [W, _const("b", RNG.standard_normal(N)), *extra], inputs, ["out"], opset)


def _fused(model) -> dict:
    (fused,) = [n for n in model.graph if n.op_type == "FusedMatMul"]
    return attributes(fused)


# --- Gemm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "trans_a, trans_b, alpha, beta, c_shape",
    [(0, 0, 1.0, 1.0, [N]), (1, 1, 0.5, 2.0, [1, N]), (0, 1, 1.5, 0.25, []), (1, 0, 1.0, 0.0, [N]),
     (0, 0, 2.0, 1.0, None)],
)
def test_gemm_becomes_one_fused_matmul(trans_a, trans_b, alpha, beta, c_shape):
    a_shape = [K, "batch"] if trans_a else ["batch", K]
    weight = W_NK if trans_b else W
    inputs = ["a", weight.name] + (["c"] if c_shape is not None else [])
    gemm = helper.make_node("Gemm", inputs, ["out"], transA=trans_a, transB=trans_b, alpha=alpha,
                            beta=beta)
    extra = [_const("c", RNG.standard_normal(c_shape))] if c_shape is not None else []
    original = _model([gemm], [weight, *extra], {"a": a_shape}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"] and changes == {"GemmToFusedMatMul": 1}
    fused = node(model, "FusedMatMul")
    assert attributes(fused) | {"beta": beta} == {
        "trans_a": trans_a, "trans_b": trans_b, "alpha": alpha, "beta": beta, "activation": "",
        "residual_after_activation": 0}
    assert len(fused.inputs) == (3 if c_shape is not None and beta != 0.0 else 2)
    assert_matches_ort(model, original, SIZES)


def test_gemm_with_activation_and_residual():
    nodes = [helper.make_node("Gemm", ["a", "w_nk", "c"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["act"]),
             helper.make_node("Add", ["r", "act"], ["out"])]
    original = _model(nodes, [W_NK, _const("c", RNG.standard_normal(N))],
                      {"a": ["batch", K], "r": ["batch", N]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert changes == {"GemmToFusedMatMul": 1, "FuseMatMulResidual": 1}
    assert _fused(model)["activation"] == "Relu" and _fused(model)["residual_after_activation"] == 1
    assert_matches_ort(model, original, SIZES)


# --- MatMul + bias -------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("bias_shape", [[N], [1, 1, N], [1]])
def test_matmul_bias(bias_first, bias_shape):
    add = ["b", "xw"] if bias_first else ["xw", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", add, ["out"])]
    original = _model(nodes, [W, _const("b", RNG.standard_normal(bias_shape))],
                      {"x": ["batch", "seq", K]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"] and changes == {"FuseMatMulBias": 1}
    assert [v.name for v in node(model, "FusedMatMul").inputs] == ["x", "w", "b"]
    assert_matches_ort(model, original, SIZES)


def test_transposed_weight_is_taken_as_trans_b():
    """torch's unoptimized export of nn.Linear: MatMul(x, Transpose(weight)) + bias."""
    nodes = [helper.make_node("Transpose", ["w_nk"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["out"])]
    original = _model(nodes, [W_NK, _const("b", RNG.standard_normal(N))], {"x": ["batch", K]},
                      ["out"])
    model, _ = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"] and _fused(model)["trans_b"] == 1
    assert [v.name for v in node(model, "FusedMatMul").inputs] == ["x", "w_nk", "b"]
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 7}])


# --- activations ---------------------------------------------------------------------------------

ONNX_ACTIVATIONS = [
    (helper.make_node("Relu", ["y"], ["out"]), [], "Relu", []),
    (helper.make_node("LeakyRelu", ["y"], ["out"], alpha=0.2), [], "LeakyRelu", [0.2]),
    (helper.make_node("Clip", ["y", "lo", "hi"], ["out"]),
     [_const("lo", -0.5), _const("hi", 1.5)], "Clip", [-0.5, 1.5]),
    (helper.make_node("Clip", ["y", "lo"], ["out"]), [_const("lo", 0.0)], "Clip", [0.0, np.inf]),
    (helper.make_node("Sigmoid", ["y"], ["out"]), [], "Sigmoid", []),
    (helper.make_node("HardSigmoid", ["y"], ["out"], alpha=0.3, beta=0.4), [], "HardSigmoid",
     [0.3, 0.4]),
    (helper.make_node("Tanh", ["y"], ["out"]), [], "Tanh", []),
    (helper.make_node("Gelu", ["y"], ["out"]), [], "Gelu", []),
    (helper.make_node("Gelu", ["y"], ["out"], approximate="tanh"), [], "GeluTanh", []),
]


@pytest.mark.parametrize("act, extra, name, params", ONNX_ACTIVATIONS,
                         ids=[f"{a.op_type}-{n}-{len(p)}" for a, _, n, p in ONNX_ACTIVATIONS])
def test_onnx_activation(act, extra, name, params):
    original = _linear(act, extra=extra)
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert changes == {"FuseMatMulBias": 1, "FuseMatMulActivation": 1}
    assert _fused(model)["activation"] == name
    assert list(_fused(model).get("activation_params", [])) == pytest.approx(params)
    assert_matches_ort(model, original, SIZES)


def test_activation_without_bias():
    nodes = [_matmul("x", "w"), helper.make_node("Tanh", ["xw"], ["out"])]
    original = _model(nodes, [W], {"x": ["batch", "seq", K]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"] and changes == {"FuseMatMulActivation": 1}
    assert_matches_ort(model, original, SIZES)


def test_activation_joins_a_product_across_a_reshape():
    """GPT-2's Conv1D: a Gemm over the flattened tokens, reshaped back before its activation."""
    shape = numpy_helper.from_array(np.array([2, -1, N], np.int64), "shape")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["xw"]),
             helper.make_node("Reshape", ["xw", "shape"], ["r"]),
             helper.make_node("Gelu", ["r"], ["out"], approximate="tanh")]
    original = _model(nodes, [W, shape], {"x": [6, K]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul", "Reshape"]
    assert changes == {"GemmToFusedMatMul": 1, "FuseMatMulActivationThroughReshape": 1}
    assert _fused(model)["activation"] == "GeluTanh"
    assert_matches_ort(model, original, [{}])


def test_reshape_read_elsewhere_keeps_the_activation_apart():
    shape = numpy_helper.from_array(np.array([2, -1, N], np.int64), "shape")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["xw"]),
             helper.make_node("Reshape", ["xw", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["out"])]
    original = _model(nodes, [W, shape], {"x": [6, K]}, ["out", "r"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul", "Reshape", "Relu"]
    assert_matches_ort(model, original, [{}])


# kiln::Activation names, and ONNX nodes computing the same from i to o for ONNX Runtime.
KILN_ACTIVATIONS = {
    "Silu": lambda i, o: [helper.make_node("Sigmoid", [i], ["sig"]),
                          helper.make_node("Mul", [i, "sig"], [o])],
    "Gelu": lambda i, o: [helper.make_node("Gelu", [i], [o])],
    "GeluTanh": lambda i, o: [helper.make_node("Gelu", [i], [o], approximate="tanh")],
    "HardSwish": lambda i, o: [helper.make_node("HardSwish", [i], [o])],
    "Mish": lambda i, o: [helper.make_node("Mish", [i], [o])],
}


@pytest.mark.parametrize("name", KILN_ACTIVATIONS)
@pytest.mark.parametrize("residual", [None, "before", "after"])
def test_kiln_activation(name, residual):
    act_in = "s" if residual == "before" else "y"
    act_out = "a" if residual == "after" else "out"
    before = [helper.make_node("Add", ["y", "r"], ["s"])] if residual == "before" else []
    after = [helper.make_node("Add", ["r", "a"], ["out"])] if residual == "after" else []
    reference = _linear(*before, *KILN_ACTIVATIONS[name](act_in, act_out), *after)
    activation = helper.make_node("Activation", [act_in], [act_out], domain="kiln", activation=name)
    original = _kiln_variant(reference, [*reference.graph.node[:2], *before, activation, *after])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert _fused(model)["activation"] == name
    assert _fused(model)["residual_after_activation"] == (residual == "after")
    assert changes["FuseMatMulResidual"] == (residual is not None)
    assert_matches_ort(model, reference, SIZES)


# --- residuals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("residual_first", [False, True])
def test_residual_after_activation(residual_first):
    add = ["r", "a"] if residual_first else ["a", "r"]
    original = _linear(helper.make_node("Relu", ["y"], ["a"]),
                       helper.make_node("Add", add, ["out"]))
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert changes == {"FuseMatMulBias": 1, "FuseMatMulResidual": 1}
    assert _fused(model)["residual_after_activation"] == 1
    assert [v.name for v in node(model, "FusedMatMul").inputs] == ["x", "w", "b", "r"]
    assert_matches_ort(model, original, SIZES)


@pytest.mark.parametrize("residual_first", [False, True])
def test_residual_before_activation(residual_first):
    add = ["r", "y"] if residual_first else ["y", "r"]
    original = _linear(helper.make_node("Add", add, ["s"]),
                       helper.make_node("Sigmoid", ["s"], ["out"]), bias_first=True)
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert changes == {"FuseMatMulBias": 1, "FuseMatMulResidual": 1, "FuseMatMulActivation": 1}
    assert _fused(model)["activation"] == "Sigmoid"
    assert _fused(model)["residual_after_activation"] == 0
    assert_matches_ort(model, original, SIZES)


def test_residual_without_bias_or_activation():
    nodes = [_matmul("x", "w"), helper.make_node("Add", ["r", "xw"], ["out"])]
    original = _model(nodes, [W], {"x": ["batch", K], "r": ["batch", N]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"] and changes == {"FuseMatMulResidual": 1}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 5}])


# --- what must stay ------------------------------------------------------------------------------

def test_product_of_two_activations_is_left_alone():
    nodes = [_matmul("q", "k"), helper.make_node("Add", ["xw", "b"], ["y"]),
             helper.make_node("Relu", ["y"], ["out"])]
    original = _model(nodes, [_const("b", RNG.standard_normal(N))],
                      {"q": ["batch", "seq", K], "k": ["batch", K, N]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["MatMul", "Add", "Relu"] and not changes


def test_bias_along_another_axis_is_not_a_bias():
    nodes = [_matmul("x", "w"), helper.make_node("Add", ["xw", "b"], ["out"])]
    original = _model(nodes, [W, _const("b", RNG.standard_normal((4, 1)))],
                      {"x": ["batch", 4, K]}, ["out"])
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["MatMul", "Add"] and not changes


def test_broadcast_residual_is_not_absorbed():
    original = _linear(helper.make_node("Add", ["y", "r"], ["out"]),
                       inputs={"x": ["batch", "seq", K], "r": [1, "seq", N]})
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul", "Add"] and changes == {"FuseMatMulBias": 1}
    assert_matches_ort(model, original, SIZES)


def test_integer_matmul_is_left_alone():
    nodes = [_matmul("x", "w"), helper.make_node("Add", ["xw", "b"], ["out"])]
    ints = [numpy_helper.from_array(np.ones((K, N), np.int32), "w"),
            numpy_helper.from_array(np.ones(N, np.int32), "b")]
    original = _model(nodes, ints, {"x": ["batch", K]}, ["out"], dtype=TensorProto.INT32)
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["MatMul", "Add"] and not changes


def test_intermediate_read_elsewhere_stays_exposed():
    """y = relu(x @ w + b) + x where relu(...) is also a graph output: the residual stays an Add."""
    original = onnx.shape_inference.infer_shapes(mlp())
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul", "Add"]
    assert changes == {"FuseMatMulBias": 1, "FuseMatMulActivation": 1}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 5}])


# --- exported from torch -------------------------------------------------------------------------

class FeedForward(nn.Module):
    """A transformer MLP with its residual, and two heads with other epilogues."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(K, 4 * K), nn.Linear(4 * K, K)
        self.head, self.mix = nn.Linear(K, N), nn.Linear(K, K)

    def forward(self, x):
        h = x + self.down(nn.functional.gelu(self.up(x)))
        return torch.relu(self.head(h)), torch.tanh(self.mix(h) + h)


@pytest.mark.parametrize("optimize", [False, True])
def test_torch_feed_forward(optimize):
    original = export(FeedForward(), (torch.randn(2, 3, K),), ["x"],
                      {"x": {0: "batch", 1: "seq"}}, optimize)
    model, changes = apply(fuse_matmul(), original)
    fused = [attributes(n) for n in model.graph if n.op_type == "FusedMatMul"]
    assert [f["activation"] for f in fused] == ["Gelu", "", "Relu", "Tanh"]
    assert [f["trans_b"] for f in fused] == [int(not optimize)] * 4
    assert changes == {"FuseMatMulBias": 4, "FuseMatMulResidual": 2, "FuseMatMulActivation": 3}
    assert "MatMul" not in ops(model) and "Add" not in ops(model)
    assert_matches_ort(model, original, [{"batch": 2, "seq": 3}, {"batch": 3, "seq": 6}])


@pytest.mark.parametrize("optimize", [False, True])
def test_torch_linear_on_matrices_is_a_gemm(optimize):
    original = export(nn.Sequential(nn.Linear(K, N), nn.Hardsigmoid()), (torch.randn(2, K),), ["x"],
                      {"x": {0: "batch"}}, optimize)
    model, changes = apply(fuse_matmul(), original)
    assert ops(model) == ["kiln::FusedMatMul"]
    assert changes == {"GemmToFusedMatMul": 1, "FuseMatMulActivation": 1}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 9}])
