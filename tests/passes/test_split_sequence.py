"""SplitSequenceToSplit: SplitToSequence read only by SequenceAt at constant positions -> Split.

Hand-built graphs (sizes as a scalar, as a list, or absent; positions counted from either end;
parts unread or read twice) and the zoo's BERT encoder and GPT-2 through the level-3 pipeline:
the graph after (no sequence op left, one Split per SplitToSequence, match counts, the sizes and
shapes of the parts) and its numbers against ONNX Runtime on the original model, on fresh random
inputs. Graphs the rule must leave alone are checked for the reason it gives.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.pipeline import optimize
from kiln.passes.rewrite import SOURCE_OPS_KEY, SOURCES_KEY
from kiln.passes.shapes import InferShapes
from kiln.passes.split_sequence import SplitSequenceToSplit
from tests.models import zoo
from tests.passes.simplify_support import FLOAT, assert_matches_onnxruntime, ints, model

RULE = "SplitSequenceToSplit"
SEQUENCE_OPS = {"SplitToSequence", "SequenceAt", "ConcatFromSequence"}
SIZES = [{"n": 2}, {"n": 5}]


def sequence_graph(split: np.ndarray | None = None, positions=(0, 1, 2), *, shape=("n", 12),
                   axis: int = 1, keepdims: int | None = None, also: list | None = None,
                   outputs: list[str] | None = None, position_input: bool = False,
                   opset: int = 17) -> onnx.ModelProto:
    """x -> SplitToSequence(axis, split?, keepdims?) -> SequenceAt(position) "at{i}" -> Neg "y{i}",
    plus the nodes ``also``; positions are constants (the last a graph input if
    ``position_input``)."""
    attributes = {"axis": axis} if keepdims is None else {"axis": axis, "keepdims": keepdims}
    nodes = [helper.make_node("SplitToSequence", ["x"] + (["split"] if split is not None else []),
                              ["sequence"], name="split_to_sequence", **attributes)]
    initializers, inputs = {}, [("x", FLOAT, list(shape))]
    if split is not None:
        initializers["split"] = split
    for i, position in enumerate(positions):
        nodes += [helper.make_node("SequenceAt", ["sequence", f"p{i}"], [f"at{i}"], name=f"item{i}"),
                  helper.make_node("Neg", [f"at{i}"], [f"y{i}"])]
        if position_input and i == len(positions) - 1:
            inputs.append((f"p{i}", TensorProto.INT64, []))
        else:
            initializers[f"p{i}"] = np.array(position, np.int64)
    nodes += also or []
    names = outputs if outputs is not None else [f"y{i}" for i in range(len(positions))]
    return model(nodes, inputs, names, initializers, opset=opset)


def rewritten(proto: onnx.ModelProto) -> tuple[ir.Model, dict]:
    """The model after shape inference and the rule, and the rule's matches."""
    ir_model = InferShapes()(load_onnx(proto)).model
    outcome = SplitSequenceToSplit()(ir_model)
    return outcome.model, dict(outcome.changes)


def split_node(ir_model: ir.Model) -> ir.Node:
    (split,) = [n for n in ir_model.graph if n.op_type == "Split"]
    return split


def split_sizes(split: ir.Node) -> list[int]:
    return split.inputs[1].const_value.numpy().tolist()


def dims(value: ir.Value) -> list:
    return [d if isinstance(d, int) else d.value for d in value.shape]


def reason(proto: onnx.ModelProto) -> str:
    ir_model = InferShapes()(load_onnx(proto)).model
    node = next(n for n in ir_model.graph if n.op_type == "SplitToSequence")
    found = SplitSequenceToSplit().match(node, ir_model.opset_imports[""])
    assert isinstance(found, str)
    return found


def op_types(ir_model: ir.Model) -> list[str]:
    return [n.op_type for n in ir_model.graph]


# --- rewritten ------------------------------------------------------------------------------------

def test_scalar_size_into_equal_parts():
    proto = sequence_graph(np.array(4, np.int64))
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    assert op_types(after) == ["Split", "Neg", "Neg", "Neg"]
    split = split_node(after)
    assert split_sizes(split) == [4, 4, 4]
    assert split.attributes.get_int("axis") == 1
    assert [v.name for v in split.outputs] == ["at0", "at1", "at2"]
    assert [dims(v) for v in split.outputs] == [["n", 4]] * 3
    assert_matches_onnxruntime(proto, after, SIZES)


def test_scalar_size_with_a_shorter_last_part():
    proto = sequence_graph(np.array(4, np.int64), positions=(2, 0, 1), shape=("n", 10))
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    split = split_node(after)
    assert split_sizes(split) == [4, 4, 2]
    assert [v.name for v in split.outputs] == ["at1", "at2", "at0"]
    assert [dims(v) for v in split.outputs] == [["n", 4], ["n", 4], ["n", 2]]
    assert_matches_onnxruntime(proto, after, SIZES)


def test_list_of_sizes_needs_no_static_axis():
    proto = sequence_graph(ints(2, 3, 5), positions=(1, 2, 0), shape=("n", "m"), axis=-1)
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    assert op_types(after) == ["Split", "Neg", "Neg", "Neg"]
    split = split_node(after)
    assert split_sizes(split) == [2, 3, 5]
    assert split.inputs[1].name == "split"  # the model's own sizes, read as they are
    assert [dims(v) for v in split.outputs] == [["n", 2], ["n", 3], ["n", 5]]
    assert_matches_onnxruntime(proto, after, [{"n": 2, "m": 10}, {"n": 3, "m": 10}])


def test_int32_sizes_become_int64():
    proto = sequence_graph(np.array([5, 7], np.int32), positions=(0, 1))
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    split = split_node(after)
    assert split.inputs[1].dtype == ir.DataType.INT64 and split_sizes(split) == [5, 7]
    assert_matches_onnxruntime(proto, after, SIZES)


def test_negative_positions_and_an_unread_part():
    proto = sequence_graph(np.array(4, np.int64), positions=(-1, -3))
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    split = split_node(after)
    assert len(split.outputs) == 3
    assert [v.name for v in (split.outputs[2], split.outputs[0])] == ["at0", "at1"]
    unread = split.outputs[1]
    assert not unread.uses() and unread.name and dims(unread) == ["n", 4]
    assert unread.dtype == ir.DataType.FLOAT
    assert_matches_onnxruntime(proto, after, SIZES)


def test_one_part_read_twice():
    proto = sequence_graph(np.array(6, np.int64), positions=(0, -2, 1))
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    split = split_node(after)
    assert [sorted(n.outputs[0].name for n, _ in v.uses()) for v in split.outputs] == [
        ["y0", "y1"], ["y2"]]
    assert_matches_onnxruntime(proto, after, SIZES)


def test_parts_that_are_graph_outputs_keep_their_names():
    proto = sequence_graph(np.array(4, np.int64), positions=(0, 1, 2, -1),
                           outputs=["y0", "at1", "at3"])
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    assert [v.name for v in after.graph.outputs] == ["y0", "at1", "at3"]
    assert [v.producer().op_type for v in after.graph.outputs] == ["Neg", "Split", "Split"]
    assert_matches_onnxruntime(proto, after, SIZES)


def test_no_sizes_parts_of_one_keep_the_axis():
    proto = sequence_graph(positions=(0, 2, 1), shape=(3, "n"), axis=0)
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    assert op_types(after) == ["Split", "Neg", "Neg", "Neg"]
    split = split_node(after)
    assert split_sizes(split) == [1, 1, 1]
    assert [dims(v) for v in split.outputs] == [[1, "n"]] * 3
    assert_matches_onnxruntime(proto, after, SIZES)


def test_no_sizes_and_keepdims_0_squeeze_the_parts():
    proto = sequence_graph(positions=(0, 2), shape=("n", 3, 4), axis=-2, keepdims=0)
    after, changes = rewritten(proto)
    assert changes == {RULE: 1}
    assert op_types(after) == ["Split", "Squeeze", "Squeeze", "Neg", "Neg"]
    squeezes = [n for n in after.graph if n.op_type == "Squeeze"]
    assert [s.outputs[0].name for s in squeezes] == ["at0", "at1"]
    assert [dims(s.outputs[0]) for s in squeezes] == [["n", 4]] * 2
    assert [s.inputs[1].const_value.numpy().tolist() for s in squeezes] == [[-2], [-2]]
    assert_matches_onnxruntime(proto, after, SIZES)


def test_new_nodes_name_their_sources():
    after, _ = rewritten(sequence_graph(np.array(4, np.int64)))
    split = split_node(after)
    assert split.name == "split_to_sequence"
    assert json.loads(split.metadata_props[SOURCES_KEY]) == [
        "split_to_sequence", "item0", "item1", "item2"]
    assert json.loads(split.metadata_props[SOURCE_OPS_KEY]) == [
        "SplitToSequence", "SequenceAt", "SequenceAt", "SequenceAt"]


def test_level_1_runs_the_rule():
    proto = sequence_graph(np.array(4, np.int64))
    after, records = optimize(load_onnx(proto), 1)
    (changes,) = [r.changes for r in records if r.name == RULE]
    assert changes == {RULE: 1}
    assert not SEQUENCE_OPS & set(op_types(after))
    assert_matches_onnxruntime(proto, after, SIZES)


# --- left alone -----------------------------------------------------------------------------------

LEFT_ALONE = {
    "concat_from_sequence": (
        {"also": [helper.make_node("ConcatFromSequence", ["sequence"], ["whole"], axis=1)],
         "outputs": ["y0", "y1", "y2", "whole"]},
        "read by ConcatFromSequence"),
    "graph_output": ({"outputs": ["y0", "y1", "y2", "sequence"]}, "the sequence is a graph output"),
    "position_not_constant": ({"position_input": True}, "not a constant integer"),
    "axis_not_static": ({"shape": (3, "n")}, "along axis 1 is not static"),
    "position_out_of_range": ({"positions": (0, 1, 3)}, "reads position 3 of 3"),
    "opset_12": ({"opset": 12}, "opset is 12"),
}


def with_last_position(position: int):
    """Random x [n, 12] and the position input ``p2``."""
    def inputs(proto, size, seed):
        x = np.random.default_rng(seed).standard_normal((size["n"], 12)).astype(np.float32)
        return {"x": x, "p2": np.array(position, np.int64)}
    return inputs


# How each graph left alone is run (the others fail in ONNX Runtime as they would in kiln, or
# output a sequence).
LEFT_ALONE_RUNS = {
    "concat_from_sequence": {"sizes": SIZES},
    "position_not_constant": {"sizes": SIZES, "inputs": with_last_position(-1)},
    "axis_not_static": {"sizes": [{"n": 12}, {"n": 10}]},
    "opset_12": {"sizes": SIZES},
}


@pytest.mark.parametrize("case", LEFT_ALONE)
def test_left_alone(case):
    kwargs, why = LEFT_ALONE[case]
    proto = sequence_graph(**{"split": np.array(4, np.int64), **kwargs})
    assert why in reason(proto)
    after, changes = rewritten(proto)
    assert changes == {}
    assert "SplitToSequence" in op_types(after) and "Split" not in op_types(after)
    if case in LEFT_ALONE_RUNS:
        assert_matches_onnxruntime(proto, after, **LEFT_ALONE_RUNS[case])


def test_sizes_that_do_not_add_up_are_left_alone():
    """Split would fail as SplitToSequence does (ONNX's checker refuses the model, so it is
    built by hand)."""
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["sequence"], axis=1),
             helper.make_node("SequenceAt", ["sequence", "p0"], ["y0"])]
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("y0", FLOAT, ["n", 4])],
        [numpy_helper.from_array(ints(4, 4), "split"), numpy_helper.from_array(np.array(0, np.int64), "p0")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "the split sizes [4, 4] do not add up to the axis' 12" in reason(proto)
    assert rewritten(proto)[1] == {}


# --- whole models ---------------------------------------------------------------------------------

TOKENS = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


@functools.cache
def exported(name: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    if name == "bert":
        return zoo.export_proto(zoo.BertEncoder(), (ids, mask), ["input_ids", "attention_mask"],
                                TOKENS)
    small_gpt2 = zoo.GPT2(vocab=1000, hidden=64, heads=4, layers=2, max_positions=128)
    return zoo.export_proto(small_gpt2, (ids,), ["input_ids"], {"input_ids": TOKENS["input_ids"]})


def tokens(proto: onnx.ModelProto, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size["batch"], size["seq"])
    feeds = {"input_ids": rng.integers(0, 1000, shape).astype(np.int64)}
    if len(proto.graph.input) > 1:
        feeds["attention_mask"] = np.ones(shape, np.int64)
        feeds["attention_mask"][-1, size["seq"] // 2:] = 0
    return feeds


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_whole_model_has_no_sequence_left(name):
    original = exported(name)
    assert sum(n.op_type == "SplitToSequence" for n in original.graph.node) == 2
    after, records = optimize(load_onnx(original), 3)
    changes = {r.name: r.changes for r in records}
    assert changes[RULE] == {RULE: 2}
    assert changes["FuseAttention"] == {"FuseMultiHeadAttention": 2}
    ops = op_types(after)
    assert not SEQUENCE_OPS & set(ops)
    assert ops.count("Split") == 2 and ops.count("Attention") == 2
    assert_matches_onnxruntime(original, after, [{"batch": 1, "seq": 16}, {"batch": 3, "seq": 7}],
                               inputs=tokens)


def test_reduced_precision_runs_the_split_in_fp16():
    """No sequence op left to keep in fp32, so no Casts around it (11 Casts with it, 3 without:
    the mask's, and the outputs')."""
    engine = kiln.build(exported("bert"), device="cpu", precision="fp16")
    layers = [(layer["op"], layer["precision"]) for layer in engine.layers]
    assert not SEQUENCE_OPS & {op for op, _ in layers}
    assert layers.count(("Split", "fp16")) == 2
    assert sum(op == "Cast" for op, _ in layers) <= 3
