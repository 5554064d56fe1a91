"""fuse_conv: convolutions with their bias, activation and residual as kiln::FusedConv; numbers
against ONNX Runtime. Where BatchNorm or activations are involved, the passes run in the
pipeline's order: fold_batchnorm, fuse_activations, fuse_conv."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from kiln.passes.fold_batchnorm import fold_batchnorm
from kiln.passes.fuse_activations import fuse_activations
from kiln.passes.fuse_conv import FuseConvResidual, fuse_conv
from tests.models.zoo import BasicBlock
from tests.passes.conv_fusion_support import (
    FoldConstants,
    assert_matches_onnxruntime,
    export_torch,
    graph_model,
    kiln_nodes,
    op_types,
    run_passes,
    sources,
)
from tests.passes.test_fold_batchnorm import randomized

SHAPES = [{"x": (1, 4, 5, 5)}, {"x": (3, 4, 8, 6)}]
INPUT = {"x": ["n", 4, "h", "w"]}


def node(op_type: str, inputs: list[str], output: str, **attributes) -> helper.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=output, **attributes)


def conv_weights(seed: int, bias: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {"w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    if bias:
        weights["b"] = rng.standard_normal(4).astype(np.float32)
    return weights


def conv(inputs: tuple[str, ...] = ("x", "w"), output: str = "c") -> helper.NodeProto:
    return node("Conv", list(inputs), output, group=2, pads=[1, 1, 1, 1])


def fused(model: ir.Model) -> ir.Node:
    (only,) = kiln_nodes(model, "FusedConv")
    return only


@pytest.mark.parametrize("bias_shape", [(4, 1, 1), (1, 4, 1, 1), ()])
@pytest.mark.parametrize("conv_first", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_bias_add_folds_into_conv(bias_shape, conv_first, conv_bias):
    extra = np.linspace(-1, 1, math.prod(bias_shape)).astype(np.float32).reshape(bias_shape)
    weights = {**conv_weights(1, bias=conv_bias), "extra": extra}
    add = node("Add", ["c", "extra"] if conv_first else ["extra", "c"], "y")
    proto = graph_model([conv(("x", "w", "b") if conv_bias else ("x", "w")), add], INPUT, {"y": None},
                        weights)

    model, changes = run_passes(proto, fuse_conv())

    assert changes == {"FoldBiasAddIntoConv": 1}
    assert op_types(model) == {"Conv": 1}
    assert_matches_onnxruntime(proto, model, SHAPES)


def test_addend_varying_over_space_is_neither_bias_nor_residual():
    weights = {**conv_weights(2), "extra": np.ones((4, 5, 5), np.float32)}
    nodes = [conv(), node("Add", ["c", "extra"], "y")]
    proto = graph_model(nodes, {"x": [2, 4, 5, 5]}, {"y": None}, weights)

    model, changes = run_passes(proto, fuse_conv())

    # [4, 5, 5] broadcasts against [2, 4, 5, 5]: fused as a residual, it would be broadcast.
    assert not changes
    assert op_types(model) == {"Conv": 1, "Add": 1}


ONNX_ACTIVATIONS = [
    ("Relu", {}, [], "Relu", []),
    ("LeakyRelu", {"alpha": 0.2}, [], "LeakyRelu", [0.2]),
    ("Elu", {}, [], "Elu", [1.0]),
    ("Clip", {}, ["zero", "six"], "Clip", [0.0, 6.0]),
    ("Sigmoid", {}, [], "Sigmoid", []),
    ("HardSigmoid", {"alpha": 0.25}, [], "HardSigmoid", [0.25, 0.5]),
    ("Tanh", {}, [], "Tanh", []),
]


@pytest.mark.parametrize("op_type, attributes, bounds, activation, params", ONNX_ACTIVATIONS)
def test_onnx_activation_fuses_into_conv(op_type, attributes, bounds, activation, params):
    weights = {**conv_weights(3, bias=True), "zero": np.float32(0), "six": np.float32(6)}
    nodes = [conv(("x", "w", "b")), node(op_type, ["c", *bounds], "y", **attributes)]
    proto = graph_model(nodes, INPUT, {"y": None}, weights)

    model, changes = run_passes(proto, fuse_conv())

    assert changes == {"FuseConvActivation": 1}
    assert op_types(model) == {"kiln::FusedConv": 1}
    fused_conv = fused(model)
    assert [v.name for v in fused_conv.inputs] == ["x", "w", "b"]
    assert fused_conv.attributes["activation"].value == activation
    assert fused_conv.attributes.get_floats("activation_params", []) == pytest.approx(params)
    assert_matches_onnxruntime(proto, model, SHAPES)


KILN_ACTIVATIONS = {  # activation: (nodes making "y" from the conv's "c", opset)
    "Silu": ([node("Sigmoid", ["c"], "s"), node("Mul", ["c", "s"], "y")], 17),
    "HardSwish": ([node("HardSwish", ["c"], "y")], 17),
    "Gelu": ([node("Gelu", ["c"], "y")], 20),
    "GeluTanh": ([node("Gelu", ["c"], "y", approximate="tanh")], 20),
    "Mish": ([node("Softplus", ["c"], "sp"), node("Tanh", ["sp"], "t"), node("Mul", ["t", "c"], "y")], 17),
}


@pytest.mark.parametrize("activation", KILN_ACTIVATIONS)
def test_kiln_activation_fuses_into_conv(activation):
    nodes, opset = KILN_ACTIVATIONS[activation]
    proto = graph_model([conv(), *nodes], INPUT, {"y": None}, conv_weights(4), opset=opset)

    model, changes = run_passes(proto, fuse_activations(), fuse_conv())

    assert changes["FuseConvActivation"] == 1
    assert op_types(model) == {"kiln::FusedConv": 1}
    assert fused(model).attributes["activation"].value == activation
    assert_matches_onnxruntime(proto, model, SHAPES)


RESIDUAL_ORDERS = {  # name: (nodes after the conv "c", reading "r"; activation; residual after it)
    "add": ([node("Add", ["c", "r"], "y")], "", 0),
    "add_swapped": ([node("Add", ["r", "c"], "y")], "", 0),
    "add_then_relu": ([node("Add", ["r", "c"], "a"), node("Relu", ["a"], "y")], "Relu", 0),
    "relu_then_add": ([node("Relu", ["c"], "a"), node("Add", ["a", "r"], "y")], "Relu", 1),
    "bias_add_then_relu": (
        [node("Add", ["c", "b"], "cb"), node("Add", ["cb", "r"], "a"), node("Relu", ["a"], "y")],
        "Relu", 0),
    "sigmoid_then_add_swapped": (
        [node("Sigmoid", ["c"], "a"), node("Add", ["r", "a"], "y")], "Sigmoid", 1),
}


@pytest.mark.parametrize("order", RESIDUAL_ORDERS)
def test_residual_fuses_before_or_after_the_activation(order):
    nodes, activation, after = RESIDUAL_ORDERS[order]
    weights = {**conv_weights(5), "b": np.arange(4, dtype=np.float32).reshape(4, 1, 1)}
    proto = graph_model([conv(), *nodes], {**INPUT, "r": ["n", 4, "h", "w"]}, {"y": None}, weights)

    model, changes = run_passes(proto, fuse_conv())

    assert changes["FuseConvResidual"] == 1
    assert op_types(model) == {"kiln::FusedConv": 1}
    fused_conv = fused(model)
    assert fused_conv.inputs[3].name == "r"
    assert fused_conv.attributes.get_string("activation", "") == activation
    assert fused_conv.attributes.get_int("residual_after_activation", 0) == after
    assert_matches_onnxruntime(proto, model, [{**s, "r": s["x"]} for s in SHAPES])


def test_activation_after_the_residual_after_an_activation_stays():
    nodes = [conv(), node("Relu", ["c"], "a"), node("Add", ["a", "r"], "ar"), node("Tanh", ["ar"], "y")]
    proto = graph_model(nodes, {**INPUT, "r": ["n", 4, "h", "w"]}, {"y": None}, conv_weights(6))

    model, changes = run_passes(proto, fuse_conv())

    assert changes == {"FuseConvActivation": 1, "FuseConvResidual": 1}
    assert op_types(model) == {"kiln::FusedConv": 1, "Tanh": 1}
    assert_matches_onnxruntime(proto, model, [{**s, "r": s["x"]} for s in SHAPES])


def test_broadcast_residual_stays_an_add():
    nodes = [conv(), node("Add", ["c", "r"], "y")]
    proto = graph_model(nodes, {**INPUT, "r": ["n", 4, 1, 1]}, {"y": None}, conv_weights(7))

    model, changes = run_passes(proto, fuse_conv())
    add = next(n for n in model.graph if n.op_type == "Add")

    assert not changes
    assert "broadcasts" in FuseConvResidual().match(add)


def test_convolution_read_elsewhere_keeps_its_epilogue_apart():
    nodes = [conv(), node("Add", ["c", "r"], "a"), node("Relu", ["a"], "y")]
    proto = graph_model(nodes, {**INPUT, "r": ["n", 4, "h", "w"]}, {"y": None, "c": None}, conv_weights(8))

    model, changes = run_passes(proto, fuse_conv())

    assert not changes
    assert op_types(model) == {"Conv": 1, "Add": 1, "Relu": 1}


def test_sum_of_two_convolutions_fuses_one_as_the_residual_of_the_other():
    shortcut = np.random.default_rng(9).standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [conv(), node("Conv", ["x", "v"], "d"), node("Add", ["c", "d"], "a"), node("Relu", ["a"], "y")]
    proto = graph_model(nodes, INPUT, {"y": None}, {**conv_weights(10), "v": shortcut})

    model, changes = run_passes(proto, fuse_conv())

    assert changes == {"FuseConvResidual": 1, "FuseConvActivation": 1}
    assert op_types(model) == {"kiln::FusedConv": 1, "Conv": 1}
    assert fused(model).inputs[3].name == "d"
    assert_matches_onnxruntime(proto, model, SHAPES)


class InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: expand (relu6), depthwise (relu6), project (no activation) + input."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.layers(x)


class Blocks(torch.nn.Module):
    """The blocks of ResNet (with and without downsampling), MobileNetV2 and EfficientNet
    (conv -> BatchNorm -> SiLU), side by side on one input: one export for all of them."""

    outputs = ["resnet", "downsampling", "mobilenet", "efficientnet"]

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.resnet = BasicBlock(channels, channels, stride=1)
        self.downsampling = BasicBlock(channels, 2 * channels, stride=2)
        self.mobilenet = InvertedResidual(channels)
        nn = torch.nn
        self.efficientnet = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        )

    def forward(self, x):
        return self.resnet(x), self.downsampling(x), self.mobilenet(x), self.efficientnet(x)


@pytest.fixture(scope="module", params=[False, True], ids=["exported", "exported_optimized"])
def blocks(request):
    """(original, optimized model, changes) of :class:`Blocks` after the three passes."""
    torch.manual_seed(0)
    proto = export_torch(randomized(Blocks()), (torch.randn(2, 8, 8, 8),),
                         {0: "batch", 2: "height", 3: "width"}, request.param, Blocks.outputs)
    passes = FoldConstants(), fold_batchnorm(), fuse_activations(), fuse_conv()
    model, changes = run_passes(proto, *passes)
    return proto, model, changes


def fused_chain(model: ir.Model, output: str) -> list[ir.Node]:
    """The FusedConv making ``output``, then the one making its X, and so on."""
    value = next(v for v in model.graph.outputs if v.name == output)
    chain = []
    while (node := value.producer()) is not None and node.op_type == "FusedConv":
        chain.append(node)
        value = node.inputs[0]
    return chain


def test_torch_blocks_become_fused_convolutions(blocks):
    proto, model, changes = blocks

    assert op_types(model) == {"kiln::FusedConv": 8, "Conv": 1}
    assert changes["FuseConvResidual"] == 3
    assert_matches_onnxruntime(proto, model, [{"x": (1, 8, 8, 8)}, {"x": (3, 8, 10, 6)}])


def test_resnet_block_is_two_fused_convolutions_with_its_sources(blocks):
    proto, model, _ = blocks
    original_ops = {n.name: n.op_type for n in proto.graph.node}

    second, first = fused_chain(model, "resnet")

    assert first.attributes["activation"].value == "Relu" and len(first.inputs) == 3
    assert second.attributes["activation"].value == "Relu"
    assert second.inputs[3].name == "x" and second.attributes["residual_after_activation"].value == 0
    fused_ops = sorted(original_ops[name] for name in sources(first) + sources(second))
    with_batchnorm = any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert fused_ops == sorted(["Conv", "Relu", "Conv", "Add", "Relu"]
                               + ["BatchNormalization"] * 2 * with_batchnorm)


def test_downsampling_block_adds_its_shortcut_convolution_as_the_residual(blocks):
    _, model, _ = blocks

    second, first = fused_chain(model, "downsampling")

    assert first.attributes["activation"].value == "Relu"
    shortcut = second.inputs[3].producer()
    assert shortcut.op_type == "Conv" and shortcut.inputs[0].name == "x"


def test_mobilenet_block_fuses_relu6_and_the_residual(blocks):
    _, model, _ = blocks

    project, depthwise, expand = fused_chain(model, "mobilenet")

    for relu6 in (expand, depthwise):
        assert relu6.attributes["activation"].value == "Clip"
        assert list(relu6.attributes["activation_params"].value) == [0.0, 6.0]
    assert project.attributes.get_string("activation", "") == "" and project.inputs[3].name == "x"


def test_efficientnet_convolution_fuses_silu(blocks):
    _, model, _ = blocks

    (conv_silu,) = fused_chain(model, "efficientnet")

    assert conv_silu.attributes["activation"].value == "Silu" and conv_silu.inputs[0].name == "x"
