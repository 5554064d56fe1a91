"""Constant folding, no-op removal, common subexpressions, and the simplification fixpoint."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.passes.shapes import InferShapes
from kiln.passes.simplify import (
    EliminateCommonSubexpressions, FoldConstants, RemoveNoOps, Simplify, simplify,
)
from tests.models import zoo
from tests.passes.simplify_support import (
    FLOAT, apply, assert_matches_onnxruntime, constant, export, ints, model, ops,
)

SIZES = [{"n": 2}, {"n": 5}]


def weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)


def initializer_array(ir_model: ir.Model, name: str) -> np.ndarray:
    return ir_model.graph.initializers[name].const_value.numpy()


# --- FoldConstants --------------------------------------------------------------------------------

def test_constants_and_weight_transposes_become_initializers():
    w = weights(6, 4)
    nodes = [
        constant("scale", np.float32(0.5)),
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["xw"]),
        helper.make_node("Mul", ["xw", "scale"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 4])], ["y"], {"w": w})
    folded, changes = apply(FoldConstants(), proto)
    assert changes == {"ConstantToInitializer": 1, "EvaluateConstantNode": 1}
    assert ops(folded) == ["MatMul", "Mul"]
    assert set(folded.graph.initializers) == {"scale", "w_t"}  # w was read once: it is gone
    np.testing.assert_array_equal(initializer_array(folded, "w_t"), w.T)
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_chains_of_constant_nodes_fold_to_one_initializer():
    nodes = [
        constant("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
        helper.make_node("Unsqueeze", ["a", "axis0"], ["a3"]),
        helper.make_node("ReduceSum", ["a3", "axis2"], ["s"], keepdims=1),
        helper.make_node("ConstantOfShape", ["three"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["s", "ones"], ["bias"]),
        helper.make_node("Add", ["x", "bias"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 2, 3])], ["y"],
                  {"axis0": ints(0), "axis2": ints(2), "three": ints(3)})
    folded, changes = apply(FoldConstants(), proto)
    assert changes == {"ConstantToInitializer": 1, "EvaluateConstantNode": 4}
    assert ops(folded) == ["Add"]
    np.testing.assert_array_equal(initializer_array(folded, "bias"), [[[4.0] * 3, [13.0] * 3]])
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_folding_never_expands_or_duplicates_large_constants():
    shared = weights(300, 300)  # 90000 elements, read by the MatMul and by the Transpose
    nodes = [
        helper.make_node("Expand", ["half", "big_shape"], ["halves"]),     # 1 -> 512*512 elements
        helper.make_node("Transpose", ["shared"], ["shared_t"]),
        helper.make_node("MatMul", ["x", "shared"], ["a"]),
        helper.make_node("MatMul", ["a", "shared_t"], ["b"]),
        helper.make_node("ReduceSum", ["halves"], ["total"], keepdims=0),
        helper.make_node("Mul", ["b", "total"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 300])], ["y"],
                  {"half": np.array([0.5], np.float32), "big_shape": ints(512, 512), "shared": shared})
    folded, changes = apply(FoldConstants(), proto)
    # The sum of the expansion folds (to one number); the expansion and the shared weight stay.
    assert changes == {"EvaluateConstantNode": 1}
    assert ops(folded) == ["Transpose", "MatMul", "MatMul", "Mul"]
    assert all(v.const_value.size <= 300 * 300 for v in folded.graph.initializers.values())
    assert_matches_onnxruntime(proto, folded, SIZES)


def per_batch_mask_model(eq_rows: np.ndarray) -> onnx.ModelProto:
    """A causal mask built at batch 8 from constants, as exporters write it at static shapes:
    (keys <= queries) & (segment[query] == segment[key]), then 0 / finfo.min, added to scores."""
    q = np.arange(16)
    segments = np.broadcast_to(eq_rows[:, None], (8, 16)).astype(np.int64)
    nodes = [
        helper.make_node("Unsqueeze", ["segments", "axes_q"], ["seg_q"]),  # [8, 1, 16, 1]
        helper.make_node("Unsqueeze", ["segments", "axes_k"], ["seg_k"]),  # [8, 1, 1, 16]
        helper.make_node("Equal", ["seg_q", "seg_k"], ["same"]),            # [8, 1, 16, 16]
        helper.make_node("And", ["causal", "same"], ["visible"]),
        helper.make_node("Where", ["visible", "zero", "lowest"], ["mask"]),
        helper.make_node("Add", ["x", "mask"], ["y"]),
    ]
    return model(nodes, [("x", FLOAT, [8, 2, 16, 16])], ["y"], {
        "segments": segments, "axes_q": ints(1, 3), "axes_k": ints(1, 2),
        "causal": (q[None, :] <= q[:, None])[None, None],
        "zero": np.float32(0), "lowest": np.float32(np.finfo(np.float32).min),
    })


def test_a_mask_built_per_batch_folds_to_the_slice_it_repeats(monkeypatch):
    monkeypatch.setattr("kiln.passes.simplify.MAX_FOLDED_ELEMENTS", 1024)  # the mask is 2048
    proto = per_batch_mask_model(np.zeros(8))  # one segment: the same causal mask for every item
    folded, changes = apply(Simplify(), proto)
    assert changes["EvaluateConstantNode"] == 5 and changes["AbsorbExpandIntoBroadcast"] == 1
    assert ops(folded) == ["Add"]
    mask = folded.graph.node(0).inputs[1].const_value.numpy()
    assert mask.shape == (1, 1, 16, 16)
    assert_matches_onnxruntime(proto, folded, [{}])


def test_a_result_that_differs_along_an_axis_is_not_cut(monkeypatch):
    monkeypatch.setattr("kiln.passes.simplify.MAX_FOLDED_ELEMENTS", 1024)
    rows = np.zeros(8)
    rows[5] = 1  # item 5 differs from the others only in its segment number: the same mask
    folded, _ = apply(Simplify(), per_batch_mask_model(rows))
    assert ops(folded) == ["Add"]  # equal segments within each item: still one slice
    rows = np.arange(8.0)
    proto = per_batch_mask_model(rows)
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(  # item 3 has two segments
        np.where(np.arange(16) < 8, 3, 4)[None].repeat(8, 0) * (np.arange(8) == 3)[:, None], "segments"))
    folded, _ = apply(Simplify(), proto)
    assert "Add" in ops(folded) and len(ops(folded)) > 1  # the mask differs per item: not folded
    assert_matches_onnxruntime(proto, folded, [{}])


def test_signed_zeros_count_as_different(monkeypatch):
    monkeypatch.setattr("kiln.passes.simplify.MAX_FOLDED_ELEMENTS", 4)
    signs = np.array([[0.0], [-0.0]], np.float32)
    nodes = [helper.make_node("Expand", ["signs", "shape"], ["wide"]),
             helper.make_node("Neg", ["wide"], ["negated"]),
             helper.make_node("Add", ["x", "negated"], ["y"])]
    proto = model(nodes, [("x", FLOAT, [2, 8])], ["y"], {"signs": signs, "shape": ints(2, 8)})
    folded, _ = apply(Simplify(), proto)
    stored = [v.const_value.numpy() for v in folded.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT]
    assert [a.shape for a in stored] == [(2, 1)]  # cut along the repeated axis only
    np.testing.assert_array_equal(np.signbit(stored[0]), [[True], [False]])


def test_an_expand_a_reader_needs_stays():
    nodes = [helper.make_node("Expand", ["row", "shape"], ["rows"]),
             helper.make_node("Add", ["x", "rows"], ["y"])]  # x [4] + rows [3, 4] -> [3, 4]
    proto = model(nodes, [("x", FLOAT, [4])], ["y"],
                  {"row": np.arange(4, dtype=np.float32)[None], "shape": ints(3, 4)})
    folded, changes = apply(RemoveNoOps(), proto)
    assert "AbsorbExpandIntoBroadcast" not in changes and ops(folded) == ["Expand", "Add"]


def test_random_ops_are_not_folded():
    nodes = [
        helper.make_node("RandomUniformLike", ["probabilities"], ["noise"], seed=1.0),
        helper.make_node("Bernoulli", ["probabilities"], ["coin"], seed=2.0),
        helper.make_node("Add", ["noise", "coin"], ["both"]),
        helper.make_node("Add", ["x", "both"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y"],
                  {"probabilities": np.full(3, 0.5, np.float32)})
    folded, changes = apply(FoldConstants(), proto)
    assert not changes
    assert ops(folded) == ["RandomUniformLike", "Bernoulli", "Add", "Add"]


def test_shape_and_size_of_static_dims_fold():
    nodes = [
        helper.make_node("Shape", ["x"], ["trailing"], start=1),  # [3, 4] whatever n is
        helper.make_node("Shape", ["x"], ["all"]),                # depends on n: stays
        helper.make_node("Size", ["w"], ["count"]),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["all"], ["all_sum"], keepdims=0),
        helper.make_node("Cast", ["all_sum"], ["all_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "rows"], ["x2"]),
        helper.make_node("Concat", ["leading", "trailing"], ["target"], axis=0),
        helper.make_node("Reshape", ["x2", "target"], ["x3"]),
        helper.make_node("Mul", ["x3", "count_f"], ["scaled"]),
        helper.make_node("Add", ["scaled", "all_f"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3, 4])], ["y"],
                  {"w": weights(2, 5), "rows": ints(-1, 12), "leading": ints(-1)}, opset=18)
    folded, changes = apply(FoldConstants(), proto)
    assert changes == {"FoldStaticShape": 2, "EvaluateConstantNode": 2}
    assert ops(folded) == ["Shape", "ReduceSum", "Cast", "Reshape", "Reshape", "Mul", "Add"]
    np.testing.assert_array_equal(initializer_array(folded, "target"), [-1, 3, 4])
    np.testing.assert_array_equal(initializer_array(folded, "count_f"), 10.0)
    assert_matches_onnxruntime(proto, folded, SIZES)


def test_castlike_folds_without_the_contents_of_like():
    nodes = [
        helper.make_node("CastLike", ["two", "x"], ["two_like_x"]),
        helper.make_node("Mul", ["x", "two_like_x"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y"], {"two": np.array(2, np.int64)})
    folded, changes = apply(FoldConstants(), proto)
    assert changes == {"EvaluateConstantNode": 1}
    assert initializer_array(folded, "two_like_x").dtype == np.float32
    assert_matches_onnxruntime(proto, folded, SIZES)


def branch(name: str, value: float) -> onnx.GraphProto:
    nodes = [
        constant(f"{name}_c", np.float32(value)),
        helper.make_node("Mul", [f"{name}_c", "factor"], [f"{name}_k"]),
        helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_out"]),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", FLOAT, None)])


def if_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch("then", 2.0),
                         else_branch=branch("else", 3.0)),
    ]
    return model(nodes, [("x", FLOAT, ["n", 3])], ["y"],
                 {"factor": np.float32(1.5), "zero": np.float32(0.0)})


def test_folding_reaches_into_subgraphs():
    proto = if_model()
    folded, changes = apply(FoldConstants(), proto)
    assert changes == {"ConstantToInitializer": 2, "EvaluateConstantNode": 2}
    if_node = folded.graph[2]
    for branch_name in ("then_branch", "else_branch"):
        subgraph = if_node.attributes[branch_name].value
        assert [n.op_type for n in subgraph] == ["Mul"]
    then_branch = if_node.attributes["then_branch"].value
    assert list(then_branch.initializers) == ["then_k"]  # then_c, read only by the fold, is gone
    assert then_branch.initializers["then_k"].const_value.numpy() == 3.0
    assert_matches_onnxruntime(proto, folded, SIZES)


# --- RemoveNoOps ----------------------------------------------------------------------------------

def node(op_type: str, inputs: list[str], **attributes) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, ["t"], **attributes)


NO_OP_CASES = {
    "RemoveIdentity": ([node("Identity", ["x"])], {}),
    "RemoveInferenceDropout": ([helper.make_node("Dropout", ["x", "ratio", "off"], ["t"])],
                               {"ratio": np.float32(0.3), "off": np.array(False)}),
    "RemoveCastToSameType": ([node("Cast", ["x"], to=TensorProto.FLOAT)], {}),
    "RemoveReshapeToSameShape": ([node("Reshape", ["x", "same"])], {"same": ints(0, -1, 4)}),
    "RemoveExpandToSameShape": ([node("Expand", ["x", "ones"])], {"ones": ints(1, 4)}),
    "RemoveIdentityTranspose": ([node("Transpose", ["x"], perm=[0, 1, 2])], {}),
    "RemoveZeroPad": ([node("Pad", ["x", "zeros"])], {"zeros": ints(0, 0, 0, 0, 0, 0)}),
    "RemoveFullSlice": ([node("Slice", ["x", "starts", "ends", "axes"])],
                        {"starts": ints(0, 0), "ends": ints(2**63 - 1, 4), "axes": ints(0, 2)}),
    "RemoveSqueezeUnsqueezePair": (
        [helper.make_node("Unsqueeze", ["x", "axis"], ["u"]), node("Squeeze", ["u", "axis"])],
        {"axis": ints(-2)}),
    "RemoveSingleInputConcat": ([node("Concat", ["x"], axis=1)], {}),
    "RemoveNeutralArithmetic": (
        [helper.make_node("Mul", ["one", "x"], ["a"]), helper.make_node("Add", ["a", "zeros"], ["b"]),
         helper.make_node("Div", ["b", "one"], ["c"]), node("Sub", ["c", "zero"])],
        {"one": np.float32(1.0), "zero": np.float32(0.0), "zeros": np.zeros((3, 1), np.float32)}),
}


@pytest.mark.parametrize("rule", list(NO_OP_CASES))
def test_no_ops_are_removed(rule):
    nodes, initializers = NO_OP_CASES[rule]
    nodes = [*nodes, helper.make_node("Relu", ["t"], ["y"])]
    proto = model(nodes, [("x", FLOAT, ["n", 3, 4])], ["y"], initializers)
    inferred, _ = apply(InferShapes(), proto)
    simplified = RemoveNoOps()(inferred)
    assert simplified.changes == {rule: len(nodes) - 1 - (rule == "RemoveSqueezeUnsqueezePair")}
    assert ops(simplified.model) == ["Relu"]
    assert simplified.model.graph[0].inputs[0].name == "x"
    assert_matches_onnxruntime(proto, simplified.model, [{"n": 2}, {"n": 3}])


KEPT_CASES = {
    "cast to another type": ([node("Cast", ["x"], to=TensorProto.DOUBLE),
                              helper.make_node("Cast", ["t"], ["t2"], to=TensorProto.FLOAT)], {}),
    "reshape that moves dims": ([node("Reshape", ["x", "other"])], {"other": ints(0, 4, 3)}),
    "expand that grows": ([node("Expand", ["x", "grow"])], {"grow": ints(2, 1, 1, 1)}),
    "training dropout": ([helper.make_node("Dropout", ["x", "zero_ratio", "on"], ["t"])],
                         {"zero_ratio": np.float32(0.0), "on": np.array(True)}),
    "dropout whose mask is read": (
        [helper.make_node("Dropout", ["x"], ["d", "mask"]),
         helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["d", "m"], ["t"])], {}),
    "partial slice": ([node("Slice", ["x", "starts", "ends"])], {"starts": ints(1), "ends": ints(99)}),
    "squeeze of other axes": (
        [helper.make_node("Unsqueeze", ["x", "axis0"], ["u"]), node("Squeeze", ["u", "axis0"]),
         helper.make_node("Unsqueeze", ["t", "axes01"], ["u2"]),
         helper.make_node("Squeeze", ["u2", "axis1"], ["t2"])],
        {"axis0": ints(0), "axis1": ints(1), "axes01": ints(0, 1)}),
    "add of zeros that broadcasts x": ([node("Add", ["x", "zeros"])],
                                       {"zeros": np.zeros((2, 1, 1, 1), np.float32)}),
    "mul by a non-one": ([node("Mul", ["x", "two"])], {"two": np.float32(2.0)}),
    "sub of x from zero": ([node("Sub", ["zero", "x"])], {"zero": np.float32(0.0)}),
}


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_ops_that_change_their_input_are_kept(case):
    nodes, initializers = KEPT_CASES[case]
    last = nodes[-1].output[0]
    nodes = [*nodes, helper.make_node("Relu", [last], ["y"])]
    proto = model(nodes, [("x", FLOAT, ["n", 3, 4])], ["y"], initializers)
    inferred, _ = apply(InferShapes(), proto)
    kept = ops(inferred)
    simplified = RemoveNoOps()(inferred)
    if case == "squeeze of other axes":  # its first pair is a no-op; the second is not
        assert simplified.changes == {"RemoveSqueezeUnsqueezePair": 1}
        assert ops(simplified.model) == ["Unsqueeze", "Squeeze", "Relu"]
    else:
        assert not simplified.changes and ops(simplified.model) == kept
    if case != "training dropout":  # random
        assert_matches_onnxruntime(proto, simplified.model, [{"n": 2}, {"n": 3}])


def test_transpose_pairs_compose():
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 2, 0]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[2, 0, 1]),   # undoes a: removed
        helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["c"], ["y"], perm=[1, 0, 2]),   # composes with c
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3, 4])], ["y"])
    simplified, changes = apply(RemoveNoOps(), proto)
    assert changes == {"ComposeTransposes": 2, "RemoveIdentityTranspose": 1}
    (transpose,) = simplified.graph
    assert transpose.inputs[0].name == "x" and list(transpose.attributes["perm"].value) == [2, 0, 1]
    assert transpose.outputs[0].name == "y"
    assert_matches_onnxruntime(proto, simplified, SIZES)


def test_a_no_op_before_a_graph_output_hands_over_the_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Identity", ["x"], ["z"])]  # input to output: must stay
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y", "z"])
    simplified, changes = apply(RemoveNoOps(), proto)
    assert changes == {"RemoveIdentity": 1}
    assert ops(simplified) == ["Relu", "Identity"]
    assert [v.name for v in simplified.graph.outputs] == ["y", "z"]
    assert_matches_onnxruntime(proto, simplified, SIZES)


# --- EliminateCommonSubexpressions ----------------------------------------------------------------

def test_twin_nodes_merge():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["x", "w"], ["b"]),
        helper.make_node("Add", ["a", "half"], ["a1"]),
        helper.make_node("Add", ["b", "half_again"], ["b1"]),  # equal constant, other name
        helper.make_node("Mul", ["a1", "b1"], ["y"]),
        helper.make_node("Bernoulli", ["p"], ["coin1"], seed=1.0),
        helper.make_node("Bernoulli", ["p"], ["coin2"], seed=1.0),  # random: never merged
        helper.make_node("Sub", ["coin1", "coin2"], ["z"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y", "z"],
                  {"w": weights(3, 3), "half": np.float32(0.5), "half_again": np.float32(0.5),
                   "p": np.full(3, 0.5, np.float32)})
    merged, changes = apply(EliminateCommonSubexpressions(), proto)
    assert changes == {"MergeCommonSubexpression": 2}
    assert ops(merged) == ["MatMul", "Add", "Mul", "Bernoulli", "Bernoulli", "Sub"]
    mul = merged.graph[2]
    assert mul.inputs[0] is mul.inputs[1]


def test_twins_merge_inside_subgraphs_too():
    def twin_branch(name: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Mul", ["x", "factor"], [f"{name}_a"]),
                 helper.make_node("Mul", ["x", "factor"], [f"{name}_b"]),
                 helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_out"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", FLOAT, None)])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=twin_branch("then"),
                         else_branch=twin_branch("else")),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y"],
                  {"factor": np.float32(1.5), "zero": np.float32(0.0)})
    merged, changes = apply(EliminateCommonSubexpressions(), proto)
    assert changes == {"MergeCommonSubexpression": 2}
    assert [n.op_type for n in merged.graph[2].attributes["then_branch"].value] == ["Mul", "Add"]
    assert_matches_onnxruntime(proto, merged, SIZES)


# --- the fixpoint ---------------------------------------------------------------------------------

def test_simplify_repeats_until_nothing_changes():
    """Folding the shape glue makes the Reshape a no-op, which only the next round removes."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Identity", ["shape"], ["shape_copy"]),
        helper.make_node("Reshape", ["x", "shape_copy"], ["same"]),
        helper.make_node("Div", ["two", "two"], ["one"]),
        helper.make_node("Mul", ["same", "one"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["y"]),
    ]
    proto = model(nodes, [("x", FLOAT, ["n", 3])], ["y"], {"two": np.float32(2.0)})
    ir_model, _ = apply(InferShapes(), proto)
    outcome = Simplify()(ir_model)
    assert outcome.changes == {
        "EvaluateConstantNode": 1, "RemoveIdentity": 1, "RemoveNeutralArithmetic": 1,
        "ReshapeTargetToConstant": 1, "RemoveReshapeToSameShape": 1,
    }
    assert ops(outcome.model) == ["Relu"]
    assert outcome.model.graph[0].inputs[0].name == "x"
    assert_matches_onnxruntime(proto, outcome.model, SIZES)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "optimized"])
def bert_onnx(request):
    ids = torch.randint(0, 1000, (2, 16))
    dynamic = {0: "batch", 1: "seq"}
    return export(zoo.BertEncoder(), (ids, torch.ones(2, 16, dtype=torch.int64)),
                  ["input_ids", "attention_mask"], {"input_ids": dynamic, "attention_mask": dynamic},
                  optimize=request.param)


def bert_inputs(proto, sizes, seed):
    rng = np.random.default_rng(seed)
    shape = (sizes["batch"], sizes["seq"])
    mask = np.ones(shape, np.int64)
    mask[0, shape[1] // 2:] = 0
    return {"input_ids": rng.integers(0, 1000, shape), "attention_mask": mask}


def test_exported_encoder_simplifies(bert_onnx):
    ir_model, _ = apply(InferShapes(), bert_onnx)
    before = ops(ir_model)
    outcome = Simplify()(ir_model)
    after = ops(outcome.model)
    assert len(after) < len(before)
    assert "Identity" not in after and "Constant" not in after and "Concat" not in after
    reshapes = [n for n in outcome.model.graph if n.op_type == "Reshape"]
    assert len(reshapes) == 8
    assert all(r.inputs[1].const_value is not None for r in reshapes)
    assert {tuple(r.inputs[1].const_value.numpy()) for r in reshapes} == {(0, 0, 4, 16), (0, 0, 64)}
    assert_matches_onnxruntime(bert_onnx, outcome.model, [{"batch": 1, "seq": 5}, {"batch": 3, "seq": 17}],
                               bert_inputs)


def test_simplify_lists_its_passes_in_order():
    assert [p.name for p in simplify()] == ["InferShapes", "Simplify"]


@pytest.mark.slow
def test_simplifying_a_bert_base_sized_encoder_is_fast(tmp_path):
    path = zoo.export(zoo.BertEncoder(hidden=768, heads=12, layers=12), (
        torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64)),
        Path(tmp_path) / "bert_base.onnx", ["input_ids", "attention_mask"],
        {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    ir_model = ir.load(path)
    start = time.perf_counter()
    for graph_pass in simplify():
        ir_model = graph_pass(ir_model).model
    assert time.perf_counter() - start < 5.0
    assert not any(n.op_type in ("Constant", "Identity", "Concat") for n in ir_model.graph)
