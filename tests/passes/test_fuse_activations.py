"""fuse_activations: decomposed and ONNX activations become kiln::Activation; numbers vs ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from kiln.passes.fuse_activations import fuse_activations
from tests.passes.conv_fusion_support import (
    FoldConstants,
    assert_matches_onnxruntime,
    export_torch,
    graph_model,
    kiln_nodes,
    op_types,
    run_passes,
)

SHAPES = [{"x": (2, 3)}, {"x": (5, 7)}]


def node(op_type: str, inputs: list[str], output: str, **attributes) -> helper.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=output, **attributes)


def numbers(**values: float) -> dict[str, np.ndarray]:
    return {name: np.array(value, np.float32) for name, value in values.items()}


# Each form: (nodes computing "y" from "x", the constants they read), as exporters write them.
GELU_ERF = {
    "div_then_mul_half": (
        [node("Div", ["x", "sqrt2"], "z"), node("Erf", ["z"], "e"), node("Add", ["e", "one"], "g"),
         node("Mul", ["x", "g"], "xg"), node("Mul", ["xg", "half"], "y")],
        numbers(sqrt2=math.sqrt(2), one=1.0, half=0.5)),
    "half_x_first": (
        [node("Mul", ["half", "x"], "hx"), node("Mul", ["x", "rsqrt2"], "z"), node("Erf", ["z"], "e"),
         node("Add", ["one", "e"], "g"), node("Mul", ["hx", "g"], "y")],
        numbers(rsqrt2=1 / math.sqrt(2), one=1.0, half=0.5)),
    "half_gate_first": (
        [node("Mul", ["rsqrt2", "x"], "z"), node("Erf", ["z"], "e"), node("Add", ["e", "one"], "g"),
         node("Mul", ["g", "half"], "hg"), node("Mul", ["x", "hg"], "y")],
        numbers(rsqrt2=1 / math.sqrt(2), one=1.0, half=0.5)),
    "divided_by_two": (
        [node("Div", ["x", "sqrt2"], "z"), node("Erf", ["z"], "e"), node("Add", ["e", "one"], "g"),
         node("Mul", ["g", "x"], "xg"), node("Div", ["xg", "two"], "y")],
        numbers(sqrt2=1.4142, one=1.0, two=2.0)),
}

GELU_TANH = {
    "pow": (
        [node("Pow", ["x", "three"], "x3"), node("Mul", ["cubic", "x3"], "cx3"),
         node("Add", ["x", "cx3"], "inner"), node("Mul", ["inner", "k"], "u"), node("Tanh", ["u"], "t"),
         node("Add", ["t", "one"], "g"), node("Mul", ["half", "x"], "hx"), node("Mul", ["hx", "g"], "y")],
        numbers(three=3.0, cubic=0.044715, k=math.sqrt(2 / math.pi), one=1.0, half=0.5)),
    "x_times_x_times_x": (
        [node("Mul", ["x", "x"], "x2"), node("Mul", ["x2", "x"], "x3"), node("Mul", ["x3", "cubic"], "cx3"),
         node("Add", ["cx3", "x"], "inner"), node("Mul", ["k", "inner"], "u"), node("Tanh", ["u"], "t"),
         node("Add", ["one", "t"], "g"), node("Mul", ["x", "g"], "xg"), node("Mul", ["half", "xg"], "y")],
        numbers(cubic=0.044715, k=math.sqrt(2 / math.pi), one=1.0, half=0.5)),
    "factored": (  # 0.5 * x * (1 + tanh(0.79788 * x * (1 + 0.044715 * x * x)))
        [node("Mul", ["x", "x"], "x2"), node("Mul", ["cubic", "x2"], "cx2"),
         node("Add", ["one", "cx2"], "p"),
         node("Mul", ["x", "k"], "kx"), node("Mul", ["kx", "p"], "u"), node("Tanh", ["u"], "t"),
         node("Add", ["t", "one"], "g"), node("Mul", ["x", "half"], "hx"), node("Mul", ["hx", "g"], "y")],
        numbers(cubic=0.044715, k=0.7978845608, one=1.0, half=0.5)),
}

SILU = {
    "x_first": ([node("Sigmoid", ["x"], "s"), node("Mul", ["x", "s"], "y")], {}),
    "sigmoid_first": ([node("Sigmoid", ["x"], "s"), node("Mul", ["s", "x"], "y")], {}),
}

HARD_SWISH = {
    "hard_sigmoid": (
        [node("HardSigmoid", ["x"], "s", alpha=1 / 6, beta=0.5), node("Mul", ["s", "x"], "y")], {}),
    "clip_div": (
        [node("Add", ["x", "three"], "a"), node("Clip", ["a", "zero", "six"], "r"),
         node("Mul", ["x", "r"], "xr"), node("Div", ["xr", "six"], "y")],
        numbers(three=3.0, zero=0.0, six=6.0)),
    "clip_mul_sixth": (
        [node("Add", ["three", "x"], "a"), node("Clip", ["a", "zero", "six"], "r"),
         node("Mul", ["r", "sixth"], "r6"), node("Mul", ["r6", "x"], "y")],
        numbers(three=3.0, zero=0.0, six=6.0, sixth=1 / 6)),
    "min_of_max": (
        [node("Add", ["x", "three"], "a"), node("Max", ["a", "zero"], "m"), node("Min", ["six", "m"], "r"),
         node("Mul", ["x", "r"], "xr"), node("Div", ["xr", "six"], "y")],
        numbers(three=3.0, zero=0.0, six=6.0)),
    "max_of_min": (
        [node("Add", ["x", "three"], "a"), node("Min", ["a", "six"], "m"), node("Max", ["m", "zero"], "r"),
         node("Mul", ["sixth", "x"], "sx"), node("Mul", ["sx", "r"], "y")],
        numbers(three=3.0, zero=0.0, six=6.0, sixth=1 / 6)),
}

MISH = {
    "softplus": (
        [node("Softplus", ["x"], "sp"), node("Tanh", ["sp"], "t"), node("Mul", ["x", "t"], "y")], {}),
    "torch_softplus": (  # softplus switching to x above torch's threshold
        [node("Softplus", ["x"], "sp0"), node("Greater", ["x", "twenty"], "big"),
         node("Where", ["big", "x", "sp0"], "sp"), node("Tanh", ["sp"], "t"), node("Mul", ["x", "t"], "y")],
        numbers(twenty=20.0)),
    "log_one_plus_exp": (
        [node("Exp", ["x"], "ex"), node("Add", ["ex", "one"], "e1"), node("Log", ["e1"], "sp"),
         node("Tanh", ["sp"], "t"), node("Mul", ["t", "x"], "y")],
        numbers(one=1.0)),
}

FORMS = [
    pytest.param(nodes, constants, rule, activation, id=f"{activation}-{name}")
    for forms, rule, activation in [
        (GELU_ERF, "FuseGeluErf", "Gelu"), (GELU_TANH, "FuseGeluTanh", "GeluTanh"),
        (SILU, "FuseSilu", "Silu"), (HARD_SWISH, "FuseHardSwish", "HardSwish"), (MISH, "FuseMish", "Mish"),
    ]
    for name, (nodes, constants) in forms.items()
]


def only_activation(model) -> str:
    assert op_types(model) == {"kiln::Activation": 1}
    (fused,) = kiln_nodes(model, "Activation")
    assert [v.name for v in fused.inputs] == ["x"] and fused.outputs[0].name == "y"
    return fused.attributes["activation"].value


@pytest.mark.parametrize("nodes, constants, rule, activation", FORMS)
def test_decomposed_activation_becomes_one_node(nodes, constants, rule, activation):
    proto = graph_model(nodes, {"x": ["n", "m"]}, {"y": None}, constants)

    model, changes = run_passes(proto, fuse_activations())

    assert changes == {rule: 1}
    assert only_activation(model) == activation
    assert_matches_onnxruntime(proto, model, SHAPES)


def test_clip_with_bounds_as_attributes_makes_hard_swish():
    nodes = [node("Add", ["x", "three"], "a"), node("Clip", ["a"], "r", min=0.0, max=6.0),
             node("Mul", ["x", "r"], "xr"), node("Div", ["xr", "six"], "y")]
    proto = graph_model(nodes, {"x": ["n", "m"]}, {"y": None}, numbers(three=3.0, six=6.0), opset=10)

    model, changes = run_passes(proto, fuse_activations())

    assert changes == {"FuseHardSwish": 1}
    assert only_activation(model) == "HardSwish"
    assert_matches_onnxruntime(proto, model, SHAPES)


@pytest.mark.parametrize("op_type, attributes, opset, activation", [
    ("Gelu", {}, 20, "Gelu"),
    ("Gelu", {"approximate": "tanh"}, 20, "GeluTanh"),
    ("Swish", {"alpha": 1.0}, 24, "Silu"),
    ("HardSwish", {}, 17, "HardSwish"),
    ("Mish", {}, 18, "Mish"),
])
def test_onnx_activation_op_becomes_kiln_activation(op_type, attributes, opset, activation):
    nodes = [node(op_type, ["x"], "y", **attributes)]
    proto = graph_model(nodes, {"x": ["n", "m"]}, {"y": None}, opset=opset)

    model, changes = run_passes(proto, fuse_activations())

    assert changes == {"ReplaceActivationOp": 1}
    assert only_activation(model) == activation
    assert_matches_onnxruntime(proto, model, SHAPES)


NEAR_MISSES = {  # name: (nodes, inputs, outputs, constants, opset)
    "gelu_with_another_coefficient": (
        GELU_ERF["div_then_mul_half"][0], {"x": ["n", "m"]}, {"y": None},
        numbers(sqrt2=math.sqrt(2), one=1.0, half=0.4), 17),
    "swish_with_alpha": ([node("Swish", ["x"], "y", alpha=1.5)], {"x": ["n", "m"]}, {"y": None}, {}, 24),
    "hard_sigmoid_with_default_slope": (
        [node("HardSigmoid", ["x"], "s"), node("Mul", ["s", "x"], "y")], {"x": ["n", "m"]}, {"y": None},
        {}, 17),
    "sigmoid_read_elsewhere": (SILU["x_first"][0], {"x": ["n", "m"]}, {"y": None, "s": None}, {}, 17),
    "constant_adding_dimensions": (  # y is [1, n], Activation(x) would be [n]
        [node("Sigmoid", ["x"], "s"), node("Mul", ["x", "one"], "x1"), node("Mul", ["x1", "s"], "y")],
        {"x": ["n"]}, {"y": None}, {"one": np.ones((1, 1), np.float32)}, 17),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_miss_stays_as_it_is(case):
    nodes, inputs, outputs, constants, opset = NEAR_MISSES[case]
    proto = graph_model(nodes, inputs, outputs, constants, opset=opset)

    model, changes = run_passes(proto, fuse_activations())

    assert not changes
    assert "kiln::Activation" not in op_types(model)


def test_input_that_is_itself_a_product_stays_outside():
    nodes = [node("Mul", ["a", "b"], "x"), node("Sigmoid", ["x"], "s"), node("Mul", ["x", "s"], "y")]
    proto = graph_model(nodes, {"a": ["n", "m"], "b": ["n", "m"]}, {"y": None})

    model, changes = run_passes(proto, fuse_activations())

    assert changes == {"FuseSilu": 1}
    assert op_types(model) == {"Mul": 1, "kiln::Activation": 1}
    assert_matches_onnxruntime(proto, model, [{"a": (2, 3), "b": (2, 3)}, {"a": (4, 5), "b": (4, 5)}])


class HandWrittenActivations(torch.nn.Module):
    """Activations as model code writes them out (Hugging Face's gelu, gelu_new, ...) and as torch
    functions."""

    def forward(self, x):
        y = 2 * x  # GELU's two forms on one input would share x * 0.5 once optimized
        return (
            x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
            0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0)))),
            x * torch.sigmoid(x),
            x * F.relu6(x + 3) / 6,
            x * torch.tanh(torch.log1p(torch.exp(x))),
            F.gelu(x),
            F.hardswish(x),
            F.mish(x),
        )


@pytest.mark.parametrize("optimize", [False, True])
def test_activations_torch_exports_write(optimize):
    proto = export_torch(HandWrittenActivations(), (torch.randn(2, 8),), {0: "batch", 1: "width"}, optimize)

    model, changes = run_passes(proto, FoldConstants(), fuse_activations())

    assert op_types(model) == {"kiln::Activation": 8, "Mul": 1}, changes
    names = [n.attributes["activation"].value for n in kiln_nodes(model, "Activation")]
    assert names == ["Gelu", "GeluTanh", "Silu", "HardSwish", "Mish", "Gelu", "HardSwish", "Mish"]
    assert_matches_onnxruntime(proto, model, [{"x": (2, 8)}, {"x": (5, 3)}])
