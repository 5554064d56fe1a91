"""Symbolic shape inference (InferShapes) and shape-arithmetic folding (FoldShapeArithmetic)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import sympy
import torch
from onnx import TensorProto, helper

from kiln.passes.shapes import (
    KILN_SHAPE_RULES, FoldShapeArithmetic, InferShapes, dim_name, parse_dim, symbol,
)
from tests.models import zoo
from tests.passes.simplify_support import (
    FLOAT, apply, assert_matches_onnxruntime, assert_shapes_hold, export, ints, model, ops,
    without_inner_shapes,
)

INT64 = TensorProto.INT64
SIZES = [{"batch": 2, "seq": 5}, {"batch": 3, "seq": 7}]


def shape_of(ir_model: ir.Model, name: str) -> list:
    value = next(o for n in ir_model.graph for o in n.outputs if o.name == name)
    return [d if isinstance(d, int) else d.value for d in value.shape]


def producer_input_shape(ir_model: ir.Model, op_type: str) -> list:
    node = next(n for n in ir_model.graph if n.op_type == op_type)
    return [d if isinstance(d, int) else d.value for d in node.inputs[0].shape]


# --- dimension names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "batch*seq", "floor(height/2 - 1/2) + 1", "Min(512, seq)", "2*`batch size`", "seq - 1",
    "Max(0, seq - 2)", "16*seq/3", "unk__3",
])
def test_dimension_names_parse_back_to_the_same_expression(name):
    assert dim_name(parse_dim(name)) == name


def test_equal_dimensions_get_equal_names():
    batch, seq = symbol("batch"), symbol("seq")
    assert dim_name(seq * batch * 768 / 768) == dim_name(parse_dim("seq*batch")) == "batch*seq"


def test_a_name_that_is_no_expression_is_one_symbol():
    assert parse_dim("batch size") == symbol("batch size")
    assert parse_dim("N") == symbol("N")  # not sympy's N()
    assert parse_dim("exec(1)") == symbol("exec(1)")  # names are parsed, never evaluated


# --- InferShapes ----------------------------------------------------------------------------------

def rows_model():
    """x[batch, seq, 8] -> rows [-1, 8] -> @ w -> back to [batch, seq, 16] through Shape glue."""
    nodes = [
        helper.make_node("Reshape", ["x", "rows_shape"], ["rows"]),
        helper.make_node("MatMul", ["rows", "w"], ["projected"]),
        helper.make_node("Shape", ["x"], ["x_shape"], end=2),
        helper.make_node("Concat", ["x_shape", "width"], ["back_shape"], axis=0),
        helper.make_node("Reshape", ["projected", "back_shape"], ["y"]),
    ]
    initializers = {"rows_shape": ints(-1, 8), "width": ints(16),
                    "w": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    return model(nodes, [("x", FLOAT, ["batch", "seq", 8])], ["y"], initializers)


def test_reshape_to_rows_gives_batch_times_seq_rows():
    proto = rows_model()
    inferred, changes = apply(InferShapes(), proto)
    assert producer_input_shape(inferred, "MatMul") == ["batch*seq", 8]
    assert shape_of(inferred, "projected") == ["batch*seq", 16]
    assert shape_of(inferred, "y") == ["batch", "seq", 16]
    assert changes["RefinedSymbolically"] > 0
    assert assert_shapes_hold(inferred, proto, SIZES) >= 6


class FlattenTokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 20)

    def forward(self, x):
        batch, seq, hidden = x.shape
        return self.proj(x.reshape(-1, hidden)).reshape(batch, seq, -1)


@pytest.fixture(scope="module")
def flatten_tokens_onnx():
    return export(FlattenTokens(), (torch.randn(2, 6, 12),), ["x"], {"x": {0: "batch", 1: "seq"}})


def test_exported_reshape_to_rows_gives_batch_times_seq(flatten_tokens_onnx):
    proto = without_inner_shapes(flatten_tokens_onnx)
    inferred, _ = apply(InferShapes(), proto)
    matmul = next(n for n in inferred.graph if n.op_type in ("MatMul", "Gemm"))
    assert [d if isinstance(d, int) else d.value for d in matmul.inputs[0].shape] == ["batch*seq", 12]
    assert [d if isinstance(d, int) else d.value for d in inferred.graph.outputs[0].shape] == \
        ["batch", "seq", 20]
    assert assert_shapes_hold(inferred, proto, SIZES) >= 4


def conv_model():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["conv"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["pool"], ["same"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("GlobalAveragePool", ["same"], ["global"]),
        helper.make_node("Flatten", ["global"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    initializers = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                    "fc": rng.standard_normal((5, 4)).astype(np.float32)}
    return model(nodes, [("x", FLOAT, ["n", 3, "height", "width"])], ["y"], initializers)


def test_conv_and_pool_dims_stay_symbolic():
    proto = conv_model()
    inferred, _ = apply(InferShapes(), without_inner_shapes(proto))
    conv_height = "floor(height/2 - 1/2) + 1"
    assert shape_of(inferred, "conv") == ["n", 4, conv_height, "floor(width/2 - 1/2) + 1"]
    assert shape_of(inferred, "pool")[2] == dim_name(sympy.floor((parse_dim(conv_height) - 2) / 2) + 1)
    assert shape_of(inferred, "global") == ["n", 4, 1, 1]
    assert shape_of(inferred, "y") == ["n", 5]
    sizes = [{"n": 2, "height": 17, "width": 20}, {"n": 1, "height": 32, "width": 9}]
    assert assert_shapes_hold(inferred, proto, sizes) >= 12


def shape_ops_model():
    """Concat on a symbolic axis, Slice with a computed end, Split, Gather, Expand, Tile, Pad,
    reductions, Transpose, Squeeze/Unsqueeze, Range, ConstantOfShape."""
    nodes = [
        helper.make_node("Concat", ["x", "x"], ["doubled"], axis=1),                # [b, 2s, 6]
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "one"], ["seq"], axis=0),            # scalar s
        helper.make_node("Unsqueeze", ["seq", "zero_axis"], ["seq_1d"]),
        helper.make_node("Slice", ["doubled", "start", "seq_1d", "axis1"], ["sliced"]),  # [b, s-1, 6]
        helper.make_node("Split", ["sliced"], ["left", "right"], axis=2, num_outputs=2),
        helper.make_node("Transpose", ["left"], ["t"], perm=[2, 0, 1]),            # [3, b, s-1]
        helper.make_node("ReduceSum", ["t", "axis1"], ["reduced"], keepdims=0),    # [3, s-1]
        helper.make_node("Unsqueeze", ["reduced", "zero_axis"], ["unsq"]),         # [1, 3, s-1]
        helper.make_node("Squeeze", ["unsq", "zero_axis"], ["sq"]),                # [3, s-1]
        helper.make_node("Pad", ["sq", "pads"], ["padded"]),                       # [3, s+1]
        helper.make_node("Tile", ["padded", "repeats"], ["tiled"]),                # [6, s+1]
        helper.make_node("Range", ["zero", "seq", "step"], ["positions"]),         # [s]
        helper.make_node("Gather", ["x", "positions"], ["gathered"], axis=1),      # [b, s, 6]
        helper.make_node("Concat", ["x_shape", "one_1d"], ["target"], axis=0),
        helper.make_node("ConstantOfShape", ["target"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),  # [b, s, 6, 1]
        helper.make_node("Expand", ["ones", "expand_to"], ["expanded"]),          # [b, s, 6, 5]
        helper.make_node("ReduceMax", ["expanded", "axis3"], ["y"], keepdims=1),    # [b, s, 6, 1]
    ]
    initializers = {
        "one": np.array(1, np.int64), "zero": np.array(0, np.int64), "step": np.array(1, np.int64),
        "zero_axis": ints(0), "axis1": ints(1), "axis3": ints(3), "start": ints(1), "one_1d": ints(1),
        "pads": ints(0, 1, 0, 1), "repeats": ints(2, 1), "expand_to": ints(1, 1, 1, 5),
    }
    return model(nodes, [("x", FLOAT, ["batch", "seq", 6])], ["y", "tiled", "gathered", "right"],
                 initializers, opset=18)


def test_shape_ops_dims_are_exact():
    proto = shape_ops_model()
    inferred, _ = apply(InferShapes(), proto)
    assert shape_of(inferred, "doubled") == ["batch", "2*seq", 6]
    assert shape_of(inferred, "sliced") == ["batch", "seq - 1", 6]
    assert shape_of(inferred, "tiled") == [6, "seq + 1"]
    assert shape_of(inferred, "right") == ["batch", "seq - 1", 3]
    assert shape_of(inferred, "gathered") == ["batch", "seq", 6]
    assert shape_of(inferred, "expanded") == ["batch", "seq", 6, 5]
    assert assert_shapes_hold(inferred, proto, SIZES) >= 15


@pytest.fixture(scope="module")
def bert_onnx():
    ids = torch.randint(0, 1000, (2, 16))
    dynamic = {0: "batch", 1: "seq"}
    return export(zoo.BertEncoder(), (ids, torch.ones(2, 16, dtype=torch.int64)),
                  ["input_ids", "attention_mask"], {"input_ids": dynamic, "attention_mask": dynamic})


def bert_inputs(proto, sizes, seed):
    rng = np.random.default_rng(seed)
    shape = (sizes["batch"], sizes["seq"])
    return {"input_ids": rng.integers(0, 1000, shape), "attention_mask": np.ones(shape, np.int64)}


def test_exported_encoder_shapes_are_recovered(bert_onnx):
    """With the exporter's shapes forgotten, inference finds them again (ONNX alone does not)."""
    exported = {o.name: o.shape for n in ir.serde.deserialize_model(bert_onnx).graph
                for o in n.outputs if o.shape is not None}
    inferred, _ = apply(InferShapes(), without_inner_shapes(bert_onnx))
    for node in inferred.graph:
        for value in node.outputs:
            if value.name in exported:
                assert value.shape == exported[value.name], value.name
    assert assert_shapes_hold(inferred, bert_onnx, SIZES, bert_inputs) > 100


def test_kiln_ops_use_their_shape_rules():
    batch, seq = ir.SymbolicDim("batch"), ir.SymbolicDim("seq")
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, seq, 8]))
    image = ir.Value(name="image", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([batch, 3, ir.SymbolicDim("h"), 8]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 16), np.float32)),
                      type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8, 16]))
    filters = ir.Value(name="f", const_value=ir.tensor(np.ones((4, 3, 3, 3), np.float32)),
                       type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 3, 3, 3]))
    matmul = ir.Node("kiln", "FusedMatMul", [a, weight], name="mm")
    conv = ir.Node("kiln", "FusedConv", [image, filters], [ir.AttrInt64s("strides", [2, 1])],
                   name="conv")
    other = ir.Node("kiln", "SomeNewFusion", [matmul.outputs[0]], name="other")
    foreign = ir.Node("com.example", "Mystery", [a], name="mystery")
    nonzero = ir.Node("", "NonZero", [a], name="nonzero")
    graph = ir.Graph([a, image], [other.outputs[0], conv.outputs[0], foreign.outputs[0],
                                  nonzero.outputs[0]],
                     nodes=[matmul, conv, other, foreign, nonzero], initializers=[weight, filters])
    test_model = ir.Model(graph, ir_version=10)
    test_model.opset_imports.update({"": 18, "kiln": 1, "com.example": 1})
    InferShapes()(test_model)
    assert [str(d) for d in matmul.outputs[0].shape] == ["batch", "seq", "16"]
    assert matmul.outputs[0].dtype == ir.DataType.FLOAT
    assert [str(d) for d in conv.outputs[0].shape] == ["batch", "4", "floor(h/2 - 3/2) + 1", "6"]
    assert [str(d) for d in other.outputs[0].shape] == ["batch", "seq", "16"]
    assert foreign.outputs[0].shape is None  # unknown ops are left as they are
    assert nonzero.outputs[0].shape is not None and nonzero.outputs[0].shape[0] == 3
    assert {"FusedMatMul", "FusedConv", "Attention"} <= set(KILN_SHAPE_RULES)


# --- FoldShapeArithmetic --------------------------------------------------------------------------

def heads_model(allowzero: int = 0):
    """Reshape(x[batch, seq, 24], Concat(Shape(x)[0], Shape(x)[1], 4, 6)) then back, the way
    exporters write multi-head attention."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["batch"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"]),
        helper.make_node("Unsqueeze", ["seq", "axis0"], ["seq_1d"]),
        helper.make_node("Concat", ["batch_1d", "seq_1d", "heads"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["x", "split_shape"], ["split"], allowzero=allowzero),
        helper.make_node("Mul", ["batch", "seq"], ["tokens"]),
        helper.make_node("Unsqueeze", ["tokens", "axis0"], ["tokens_1d"]),
        helper.make_node("Concat", ["tokens_1d", "width"], ["rows_shape"], axis=0),
        helper.make_node("Reshape", ["split", "rows_shape"], ["y"], allowzero=allowzero),
    ]
    initializers = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "axis0": ints(0),
                    "heads": ints(4, 6), "width": ints(24)}
    return model(nodes, [("x", FLOAT, ["batch", "seq", 24])], ["y"], initializers)


@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_targets_from_shape_glue_become_constants(allowzero):
    proto = heads_model(allowzero)
    folded, changes = apply(FoldShapeArithmetic(), proto)
    assert changes == {"ReshapeTargetToConstant": 2}
    assert ops(folded) == ["Reshape", "Reshape"]
    first, second = folded.graph
    assert first.inputs[1].const_value.numpy().tolist() == [0, 0, 4, 6]
    assert first.attributes.get_int("allowzero", 0) == 0  # so 0 copies the input's dim
    assert second.inputs[1].const_value.numpy().tolist() == [-1, 24]
    assert [str(d) for d in second.outputs[0].shape] == ["batch*seq", "24"]
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_expand_target_from_shape_glue_becomes_constant():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start0", "end1"], ["batch"]),
        helper.make_node("Slice", ["shape", "start2", "end3"], ["seq"]),
        helper.make_node("Concat", ["batch", "four", "seq"], ["target"], axis=0),
        helper.make_node("Expand", ["x", "target"], ["y"]),
    ]
    initializers = {"start0": ints(0), "end1": ints(1), "start2": ints(2), "end3": ints(3),
                    "four": ints(4)}
    proto = model(nodes, [("x", FLOAT, ["batch", 1, "seq"])], ["y"], initializers)
    folded, changes = apply(FoldShapeArithmetic(), proto)
    assert changes == {"ExpandTargetToConstant": 1}
    assert ops(folded) == ["Expand"]
    assert folded.graph[0].inputs[1].const_value.numpy().tolist() == [1, 4, 1]
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_static_dims_of_symbolic_shapes_become_constants():
    """Shape(x)[2] of x[batch, seq, 12] is 12 whatever batch and seq are."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start0", "end2"], ["leading"]),
        helper.make_node("Gather", ["shape", "i2"], ["width"], axis=0),
        helper.make_node("Div", ["width", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "axis0"], ["half_1d"]),
        helper.make_node("Concat", ["leading", "two_1d", "half_1d"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    initializers = {"start0": ints(0), "end2": ints(2), "i2": np.array(2, np.int64),
                    "two": np.array(2, np.int64), "axis0": ints(0), "two_1d": ints(2)}
    proto = model(nodes, [("x", FLOAT, ["batch", "seq", 12])], ["y"], initializers)
    folded, changes = apply(FoldShapeArithmetic(), proto)
    assert changes["ShapeValueToConstant"] >= 1 and changes["ReshapeTargetToConstant"] == 1
    assert ops(folded) == ["Reshape"]
    assert folded.graph[0].inputs[1].const_value.numpy().tolist() == [0, 0, 2, 6]
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_reshape_targets_that_need_two_inferred_dims_stay():
    """[a, b, c] -> [b, a*c]: neither entry copies the input's dim at its place."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["a"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["b"], axis=0),
        helper.make_node("Mul", ["a", "c"], ["ac"]),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b_1d"]),
        helper.make_node("Unsqueeze", ["ac", "axis0"], ["ac_1d"]),
        helper.make_node("Concat", ["b_1d", "ac_1d"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    initializers = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64),
                    "c": np.array(3, np.int64), "axis0": ints(0)}
    proto = model(nodes, [("x", FLOAT, ["a", "b", 3])], ["y"], initializers)
    folded, changes = apply(FoldShapeArithmetic(), proto)
    assert "ReshapeTargetToConstant" not in changes
    assert "Reshape" in ops(folded) and "Concat" in ops(folded)
    assert [str(d) for d in folded.graph.outputs[0].shape] == ["b", "3*a"]
    assert_matches_onnxruntime(proto, folded, [{"a": 2, "b": 5}, {"a": 4, "b": 3}])


def test_reshape_target_from_an_input_tensor_stays():
    nodes = [helper.make_node("Reshape", ["x", "target"], ["y"])]
    proto = model(nodes, [("x", FLOAT, ["n", 6]), ("target", INT64, [2])], ["y"])
    folded, changes = apply(FoldShapeArithmetic(), proto)
    assert not changes and ops(folded) == ["Reshape"]
