"""fold_batchnorm: the graph after it, and its numbers against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from kiln.passes.fold_batchnorm import (
    FoldBatchNormIntoConv,
    FoldBatchNormIntoMatMul,
    fold_batchnorm,
)
from tests.models.zoo import BasicBlock
from tests.passes.conv_fusion_support import (
    FoldConstants,
    assert_matches_onnxruntime,
    export_torch,
    graph_model,
    op_types,
    run_passes,
)


def batchnorm_parameters(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "shift": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
        "mean": rng.uniform(-0.5, 0.5, channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def batchnorm(input_name: str, output: str = "y") -> helper.NodeProto:
    inputs = [input_name, "scale", "shift", "mean", "var"]
    return helper.make_node("BatchNormalization", inputs, [output], epsilon=1e-3, name="bn")


@pytest.mark.parametrize("op_type", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batchnorm_folds_into_a_grouped_convolution(op_type, with_bias):
    rng = np.random.default_rng(1)
    # Conv's weight is [Cout, Cin/group, k, k]; ConvTranspose's [Cin, Cout/group, k, k].
    weight_shape = (6, 2, 3, 3) if op_type == "Conv" else (4, 3, 3, 3)
    weights = {"w": rng.standard_normal(weight_shape).astype(np.float32),
               **batchnorm_parameters(rng, 6)}
    inputs = ["x", "w"]
    if with_bias:
        weights["b"] = rng.standard_normal(6).astype(np.float32)
        inputs.append("b")
    conv = helper.make_node(op_type, inputs, ["c"], group=2, pads=[1, 1, 1, 1], name="conv")
    proto = graph_model([conv, batchnorm("c")], {"x": ["n", 4, "h", "w"]}, {"y": None}, weights)

    model, changes = run_passes(proto, fold_batchnorm())

    rule = "FoldBatchNormIntoConv" if op_type == "Conv" else "FoldBatchNormIntoConvTranspose"
    assert changes == {rule: 1}
    assert op_types(model) == {op_type: 1}
    (folded,) = model.graph
    assert len(folded.inputs) == 3 and folded.name == "conv"
    assert_matches_onnxruntime(proto, model, [{"x": (1, 4, 5, 5)}, {"x": (3, 4, 8, 6)}])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_batchnorm_folds_into_gemm(trans_b, with_c):
    rng = np.random.default_rng(2)
    weights = {"w": rng.standard_normal((7, 5) if trans_b else (5, 7)).astype(np.float32),
               **batchnorm_parameters(rng, 7)}
    inputs = ["x", "w"]
    if with_c:
        weights["c"] = rng.standard_normal(7).astype(np.float32)
        inputs.append("c")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.5, beta=2.0, name="gemm")
    proto = graph_model([gemm, batchnorm("g")], {"x": ["n", 5]}, {"y": None}, weights)

    model, changes = run_passes(proto, fold_batchnorm())

    assert changes == {"FoldBatchNormIntoGemm": 1}
    assert op_types(model) == {"Gemm": 1}
    assert_matches_onnxruntime(proto, model, [{"x": (1, 5)}, {"x": (9, 5)}])


@pytest.mark.parametrize("bias", [None, "after", "before"])
def test_batchnorm_folds_into_matmul_and_its_bias(bias):
    rng = np.random.default_rng(3)
    weights = {"w": rng.standard_normal((5, 7)).astype(np.float32), **batchnorm_parameters(rng, 7)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul")]
    if bias:
        weights["b"] = rng.standard_normal(7).astype(np.float32)
        operands = ["m", "b"] if bias == "after" else ["b", "m"]
        nodes.append(helper.make_node("Add", operands, ["mb"], name="bias"))
    nodes.append(batchnorm("mb" if bias else "m"))
    proto = graph_model(nodes, {"x": ["n", 5]}, {"y": None}, weights)

    model, changes = run_passes(proto, fold_batchnorm())

    assert changes == {"FoldBatchNormIntoMatMul": 1}
    assert op_types(model) == {"MatMul": 1, "Add": 1}
    assert_matches_onnxruntime(proto, model, [{"x": (1, 5)}, {"x": (6, 5)}])


def test_batchnorm_stays_when_the_layer_output_is_read_elsewhere():
    rng = np.random.default_rng(4)
    weights = {"w": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),
               **batchnorm_parameters(rng, 6)}
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    proto = graph_model([conv, batchnorm("c")], {"x": [1, 4, 3, 3]}, {"y": None, "c": None}, weights)

    model, changes = run_passes(proto, fold_batchnorm())

    assert not changes
    assert op_types(model) == {"Conv": 1, "BatchNormalization": 1}


def test_batchnorm_stays_after_a_convolution_with_weights_given_at_run_time():
    rng = np.random.default_rng(5)
    inputs = {"x": [1, 4, 3, 3], "w": [6, 4, 1, 1]}
    proto = graph_model([helper.make_node("Conv", ["x", "w"], ["c"]), batchnorm("c")], inputs,
                        {"y": None}, batchnorm_parameters(rng, 6))
    model, changes = run_passes(proto, fold_batchnorm())
    (bn,) = [n for n in model.graph if n.op_type == "BatchNormalization"]

    assert not changes
    assert FoldBatchNormIntoConv().match(bn).startswith("the weight is not constant")


def test_batchnorm_stays_after_a_matmul_of_rank_three():
    # On [N, C, K] BatchNormalization's channel axis is 1, not MatMul's output axis.
    rng = np.random.default_rng(6)
    weights = {"w": rng.standard_normal((5, 4)).astype(np.float32), **batchnorm_parameters(rng, 4)}
    proto = graph_model([helper.make_node("MatMul", ["x", "w"], ["m"]), batchnorm("m")],
                        {"x": [2, 4, 5]}, {"y": None}, weights)
    model, changes = run_passes(proto, fold_batchnorm())
    (bn,) = [n for n in model.graph if n.op_type == "BatchNormalization"]

    assert not changes
    assert "rank 2" in FoldBatchNormIntoMatMul().match(bn)


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so a wrong fold shows in the numbers."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return module


def test_batchnorms_of_a_torch_resnet_block_fold_into_its_convolutions():
    torch.manual_seed(0)
    block = randomized(BasicBlock(4, 8, stride=2))
    proto = export_torch(block, (torch.randn(2, 4, 8, 8),), {0: "batch", 2: "height", 3: "width"},
                         optimize=False)

    model, changes = run_passes(proto, FoldConstants(), fold_batchnorm())

    assert changes == {"FoldBatchNormIntoConv": 3}
    assert op_types(model) == {"Conv": 3, "Relu": 2, "Add": 1}
    assert_matches_onnxruntime(proto, model, [{"x": (1, 4, 8, 8)}, {"x": (3, 4, 10, 6)}])
