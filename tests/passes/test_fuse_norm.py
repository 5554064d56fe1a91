"""fuse_norm: LayerNormalization, RMSNormalization and their decomposed forms -> kiln norms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kiln.passes.fuse_matmul import fuse_matmul
from kiln.passes.fuse_norm import fuse_norm
from tests.passes.matmul_norm_common import (
    apply,
    assert_matches_ort,
    attributes,
    export,
    node,
    ops,
)

H = 16
SIZES = [{"batch": 2, "seq": 3}, {"batch": 3, "seq": 5}]
DYNAMIC = {0: "batch", 1: "seq"}
RNG = np.random.default_rng(0)


def _export(module: nn.Module, optimize: bool, n_inputs: int = 1, dtype=torch.float32,
            shape=(2, 3, H)) -> onnx.ModelProto:
    names = ["x", "r"][:n_inputs]
    example = tuple(torch.randn(*shape, dtype=dtype) for _ in names)
    return export(module, example, names, {name: DYNAMIC for name in names}, optimize)


def _const(name: str, array, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype), name)


def _model(nodes, initializers, inputs: dict[str, list], outputs: list[str], opset: int = 18):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _names(values) -> list[str | None]:
    return [v.name if v is not None else None for v in values]


# --- ONNX's norm ops, as torch exports nn.LayerNorm ----------------------------------------------

@pytest.mark.parametrize("optimize, bias, shape",
                         [(False, True, H), (True, False, H), (False, False, (3, H)),
                          (True, True, (3, H))])
def test_torch_layer_norm(optimize, bias, shape):
    original = _export(nn.LayerNorm(shape, eps=1e-6, bias=bias), optimize, shape=(2, 3, H))
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::LayerNorm"] and changes == {"LayerNormalizationToLayerNorm": 1}
    norm = node(model, "LayerNorm")
    assert len(norm.inputs) == (3 if bias else 2)
    assert attributes(norm) == {"axis": -1 if shape == H else -2, "epsilon": pytest.approx(1e-6)}
    sizes = [{"batch": 2, "seq": 3}, {"batch": 5, "seq": 3}] if shape != H else SIZES
    assert_matches_ort(model, original, sizes)


def test_layer_normalization_with_statistics_read_is_left_alone():
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean"])]
    parameters = [_const("s", RNG.standard_normal(H)), _const("b", RNG.standard_normal(H))]
    original = _model(nodes, parameters, {"x": ["batch", H]}, ["y", "mean"])
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["LayerNormalization"] and not changes


def test_rms_normalization():
    nodes = [helper.make_node("RMSNormalization", ["x", "s"], ["out"], epsilon=1e-3, axis=-2)]
    original = _model(nodes, [_const("s", RNG.standard_normal((3, H)))], {"x": ["batch", 3, H]},
                      ["out"], opset=23)
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::RMSNorm"] and changes == {"RMSNormalizationToRMSNorm": 1}
    assert attributes(node(model, "RMSNorm")) == {"axis": -2, "epsilon": pytest.approx(1e-3)}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 4}])


# --- decomposed, as torch exports hand-written norms ---------------------------------------------

class HandLayerNorm(nn.Module):
    def __init__(self, bias: bool, spelling: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H))
        self.bias = nn.Parameter(torch.randn(H)) if bias else None
        self.spelling = spelling

    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        if self.spelling == "div-pow":
            y = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5)
        else:
            y = centered * torch.rsqrt((centered * centered).mean(-1, keepdim=True) + 1e-5)
        y = self.weight * y
        return y + self.bias if self.bias is not None else y


@pytest.mark.parametrize("optimize, bias, spelling",
                         [(False, True, "div-pow"), (True, False, "div-pow"),
                          (False, False, "rsqrt-square"), (True, True, "rsqrt-square")])
def test_torch_hand_written_layer_norm(optimize, bias, spelling):
    original = _export(HandLayerNorm(bias, spelling), optimize)
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::LayerNorm"]
    rule = "FuseDecomposedLayerNorm" if bias else "FuseDecomposedLayerNormWithoutBias"
    assert changes == {rule: 1}
    norm = node(model, "LayerNorm")
    assert _names(norm.inputs) == (["x", "weight", "bias"] if bias else ["x", "weight"])
    assert attributes(norm) == {"axis": -1, "epsilon": pytest.approx(1e-5)}
    assert_matches_ort(model, original, SIZES)


class LlamaRMSNorm(nn.Module):
    """LLaMA's (and, with ``t5=True``, T5's) RMSNorm: statistics in float32, weight in x's type."""

    def __init__(self, dtype: torch.dtype, t5: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H).to(dtype))
        self.t5 = t5

    def forward(self, x):
        dtype = x.dtype
        if self.t5:  # x is cast to float32 once per use
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + 1e-6)).to(dtype)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize(
    "dtype, t5", [(torch.float32, False), (torch.float16, False), (torch.float16, True)],
    ids=["llama-fp32", "llama-fp16", "t5-fp16"],
)
def test_torch_rms_norm(optimize, dtype, t5):
    original = _export(LlamaRMSNorm(dtype, t5), optimize, dtype=dtype)
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::RMSNorm"] and changes == {"FuseDecomposedRMSNorm": 1}
    norm = node(model, "RMSNorm")
    assert _names(norm.inputs) == ["x", "weight"]
    assert attributes(norm) == {"axis": -1, "epsilon": pytest.approx(1e-6)}
    # float16 results round to 11 bits; the statistics are float32 in both.
    assert_matches_ort(model, original, SIZES, tolerance=1e-4 if dtype == torch.float32 else 2e-3)


def _decomposed_layer_norm(opset: int, axes: list[int], x_shape: list, scale_shape: list,
                           mean_axes: list[int] | None = None, eps_input: bool = False):
    """(x - mean) * Reciprocal(Sqrt(mean((x - mean)²) + eps)) spelled with reversed operands."""
    def reduce(inp, out, reduce_axes):
        if opset >= 18:
            return [helper.make_node("ReduceMean", [inp, f"{out}_axes"], [out])], [
                _const(f"{out}_axes", reduce_axes, np.int64)]
        return [helper.make_node("ReduceMean", [inp], [out], axes=reduce_axes)], []

    mean_nodes, mean_init = reduce("x", "mean", mean_axes or axes)
    var_nodes, var_init = reduce("sq", "var", axes)
    nodes = [
        *mean_nodes,
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        *var_nodes,
        helper.make_node("Add", ["eps", "var"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inv"]),
        helper.make_node("Mul", ["inv", "d"], ["n"]),
        helper.make_node("Mul", ["s", "n"], ["sn"]),
        helper.make_node("Add", ["b", "sn"], ["out"]),
    ]
    initializers = [*mean_init, *var_init, _const("s", RNG.standard_normal(scale_shape)),
                    _const("b", RNG.standard_normal(scale_shape))]
    inputs = {"x": x_shape}
    if eps_input:
        inputs["eps"] = []
    else:
        initializers.append(_const("eps", 1e-4))
    return _model(nodes, initializers, inputs, ["out"], opset)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes, scale_shape",
                         [([-1], [H]), ([-2, -1], [4, H]), ([2], [H]), ([1, 2], [1])])
def test_decomposed_layer_norm_spellings(opset, axes, scale_shape):
    original = _decomposed_layer_norm(opset, axes, ["batch", 4, H], scale_shape)
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::LayerNorm"] and changes == {"FuseDecomposedLayerNorm": 1}
    expected = {"axis": -len(axes), "epsilon": pytest.approx(1e-4)}
    assert attributes(node(model, "LayerNorm")) == expected
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 5}])


@pytest.mark.parametrize(
    "case, options",
    [("axes not trailing", {"axes": [1]}),
     ("epsilon not constant", {"axes": [-1], "eps_input": True}),
     ("scale over a normalized and another axis", {"axes": [-1], "scale_shape": [4, H]})],
)
def test_decomposed_layer_norm_that_is_not_one(case, options):
    options = {"scale_shape": [H], **options}
    original = _decomposed_layer_norm(18, options.pop("axes"), ["batch", 4, H], **options)
    model, changes = apply(fuse_norm(), original)
    assert "kiln::LayerNorm" not in ops(model) and not changes, case


def test_centered_by_a_mean_over_other_axes_is_an_rms_norm_of_the_difference():
    original = _decomposed_layer_norm(18, [-1], ["batch", 4, H], [H], mean_axes=[-2, -1])
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["ReduceMean", "Sub", "kiln::RMSNorm", "Add"]
    assert changes == {"FuseDecomposedRMSNorm": 1}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 5}])


# --- residuals -----------------------------------------------------------------------------------

class PreLNBlock(nn.Module):
    """GPT-2's order: h = x + attn(x); out = h + mlp(ln(h)) -- the sum h is read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp, self.ln = nn.Linear(H, H), nn.Linear(H, H), nn.LayerNorm(H)

    def forward(self, x):
        h = x + self.attn(x)
        return h + self.mlp(self.ln(h))


@pytest.mark.parametrize("optimize", [False, True])
def test_pre_ln_residual_sum_is_a_second_output(optimize):
    original = _export(PreLNBlock(), optimize)
    model, changes = apply(fuse_norm(), original)
    assert changes == {"LayerNormalizationToLayerNorm": 1, "FuseResidualIntoNorm": 1}
    norm = node(model, "LayerNorm")
    assert len(norm.inputs) == 4 and len(norm.outputs) == 2
    assert norm.inputs[0].name == "x" and norm.inputs[3].producer().op_type == "Add"  # attn's bias
    assert [(u.op_type, i) for u, i in norm.outputs[1].uses()] == [("Add", 0)]
    assert_matches_ort(model, original, SIZES)
    # Then the epilogue fusions of the next level: three nodes in all.
    model = fuse_matmul()(model).model
    assert ops(model) == ["kiln::FusedMatMul", "kiln::LayerNorm", "kiln::FusedMatMul"]
    assert_matches_ort(model, original, SIZES)


class PostNorm(nn.Module):
    def __init__(self, rms: bool) -> None:
        super().__init__()
        self.norm = LlamaRMSNorm(torch.float32) if rms else nn.LayerNorm(H)

    def forward(self, x, r):
        return self.norm(x + r)


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("rms", [False, True], ids=["layer-norm", "rms-norm"])
def test_residual_read_only_by_the_norm(optimize, rms):
    original = _export(PostNorm(rms), optimize, n_inputs=2)
    model, changes = apply(fuse_norm(), original)
    op = "RMSNorm" if rms else "LayerNorm"
    assert ops(model) == [f"kiln::{op}"] and changes["FuseResidualIntoNorm"] == 1
    norm = node(model, op)
    assert len(norm.outputs) == 1
    parameters = ["norm.weight"] if rms else ["norm.weight", "norm.bias"]
    assert _names(norm.inputs) == ["x", *parameters, "r"]
    assert_matches_ort(model, original, SIZES)


def test_residual_sum_that_is_a_graph_output():
    """LLaMA's decoder: h = x + r feeds the RMSNorm and is returned; LayerNorm without a bias."""
    nodes = [helper.make_node("Add", ["x", "r"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "s"], ["out"], epsilon=1e-3)]
    original = _model(nodes, [_const("s", RNG.standard_normal(H))],
                      {"x": ["batch", H], "r": ["batch", H]}, ["out", "h"])
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["kiln::LayerNorm"]
    norm = node(model, "LayerNorm")
    assert _names(norm.inputs) == ["x", "s", None, "r"] and _names(norm.outputs) == ["out", "h"]
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 6}])


def test_broadcast_residual_is_not_absorbed():
    nodes = [helper.make_node("Add", ["x", "r"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "s"], ["out"])]
    original = _model(nodes, [_const("s", RNG.standard_normal(H))],
                      {"x": ["batch", H], "r": [1, H]}, ["out"])
    model, changes = apply(fuse_norm(), original)
    assert ops(model) == ["Add", "kiln::LayerNorm"]
    assert changes == {"LayerNormalizationToLayerNorm": 1}
    assert_matches_ort(model, original, [{"batch": 2}, {"batch": 6}])
