"""FusePackedQkvAttention: timm's packed head split (one qkv projection reshaped to [b, s, 3, h, d],
permuted (2, 0, 3, 1, 4) and unbound), the attention and the head merge become one
kiln::Attention(layout="bsd_packed") on the projection.

Torch exports (dynamic batch and token count, exporter optimisation off and on) through the real
level-3 pipeline, and hand-built graphs of the other ways to take Q, K and V out: the graph after
(one kiln::Attention per block, no glue left, match counts) and its numbers against ONNX Runtime on
the original model at two shapes.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from kiln.frontend.onnx import load_onnx
from kiln.passes.pipeline import optimize
from kiln.passes.shapes import InferShapes
from tests.models import zoo
from tests.models.zoo import ViTBlock
from tests.passes.test_fuse_attention import (
    FLOAT, HEAD_DIM, HEADS, HIDDEN, assert_matches_ort, attentions, graph_model, op_types,
)

SHAPES = ({"batch": 2, "tokens": 5}, {"batch": 3, "tokens": 9})
# What the head split and merge leave when they are not fused.
GLUE = {"Reshape", "Transpose", "Slice", "Squeeze", "Gather", "Split", "SplitToSequence",
        "SequenceAt"}
PACKED = {"num_heads": HEADS, "scale": pytest.approx(HEAD_DIM ** -0.5), "causal": 0,
          "mask_kind": "none", "layout": "bsd_packed", "masked_rows": "nan"}


# --- torch exports through the pipeline ---------------------------------------------------------

class PackedAttention(nn.Module):
    """timm's attention: one qkv projection permuted into heads, Q, K and V taken out by ``take``
    ("unbind", "index": qkv[0], qkv[1], qkv[2], "split": split(1) and squeeze), then SDPA or the
    attention written out."""

    def __init__(self, take: str, sdpa: bool) -> None:
        super().__init__()
        self.take, self.sdpa = take, sdpa
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        if self.take == "unbind":
            q, k, v = qkv.unbind(0)
        elif self.take == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = (part.squeeze(0) for part in qkv.split(1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, hidden))


class SeparateQkvAttention(nn.Module):
    """timm's other attention: q, k and v projections, each reshaped and transposed into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def forward(self, x):
        batch, tokens, hidden = x.shape
        q, k, v = (p(x).reshape(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, hidden))


MODELS = {
    "vit_blocks": lambda: nn.Sequential(ViTBlock(HIDDEN, HEADS), ViTBlock(HIDDEN, HEADS)),
    "unbind_written_out": lambda: PackedAttention("unbind", sdpa=False),
    "index": lambda: PackedAttention("index", sdpa=True),
    "split": lambda: PackedAttention("split", sdpa=True),
    "separate": SeparateQkvAttention,
}


@functools.cache
def exported(name: str, optimize_export: bool) -> onnx.ModelProto:
    """MODELS[name] on x [batch, tokens, HIDDEN] through torch's dynamo exporter (once)."""
    return zoo.export_proto(MODELS[name](), (torch.randn(2, 5, HIDDEN),), ["x"],
                            {"x": {0: "batch", 1: "tokens"}}, optimize_export, dim_range=(2, 16))


def optimized(proto: onnx.ModelProto) -> tuple[ir.Model, dict]:
    """The model after the level-3 pipeline, and the matches of its attention pass."""
    model, records = optimize(load_onnx(proto), 3)
    (changes,) = [record.changes for record in records if record.name == "FuseAttention"]
    return model, changes


def glue_left(model: ir.Model) -> set[str]:
    return GLUE & {n.op_type for n in model.graph if n.domain == ""}


OPTIMIZE = pytest.mark.parametrize("optimize_export", [False, True], ids=["plain", "optimized"])


@OPTIMIZE
def test_vit_blocks_become_one_attention_each(optimize_export):
    original = exported("vit_blocks", optimize_export)
    model, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 2, "FusePackedQkvAttention": 2}
    assert attentions(model) == [PACKED] * 2
    assert not glue_left(model)
    assert_matches_ort(model, original, SHAPES)


def test_shape_inference_knows_the_packed_attention_output():
    model, _ = optimized(exported("vit_blocks", False))
    attention = next(n for n in model.graph if n.op_type == "Attention")
    attention.outputs[0].shape = None
    InferShapes()(model)
    dims = [d if isinstance(d, int) else d.value for d in attention.outputs[0].shape]
    assert dims == ["batch", "tokens", HIDDEN]


@OPTIMIZE
@pytest.mark.parametrize("name", ["unbind_written_out", "index", "split"])
def test_other_ways_to_take_q_k_v_out(name, optimize_export):
    """Slice + Squeeze (unbind), Gather (indexing), SplitToSequence or Split, then Squeeze."""
    original = exported(name, optimize_export)
    model, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 1, "FusePackedQkvAttention": 1}
    assert attentions(model) == [PACKED]
    assert not glue_left(model)
    assert_matches_ort(model, original, SHAPES)


@OPTIMIZE
def test_separate_projections_still_fuse_whole(optimize_export):
    original = exported("separate", optimize_export)
    model, changes = optimized(original)
    assert changes == {"FuseMultiHeadAttention": 1}
    assert attentions(model) == [PACKED]  # the three projections merged, read packed
    assert not glue_left(model)
    assert_matches_ort(model, original, SHAPES)


# --- hand-built graphs --------------------------------------------------------------------------

INT64_MAX = np.iinfo(np.int64).max


def taken_by(take: str, order: tuple[int, int, int]) -> tuple[list, list]:
    """Nodes taking Q, K and V (parts ``order`` of "parts", along axis 0) out as "q", "k", "v",
    and the constants they read."""
    names = ["q", "k", "v"]
    axis0 = ("axis0", np.array([0], np.int64))
    if take == "gather":  # scalar indices, the last one negative
        indices = [(f"i{n}", np.array(i - 3 * (n == "v"), np.int64)) for n, i in zip(names, order)]
        return [helper.make_node("Gather", ["parts", f"i{n}"], [n], axis=0) for n in names], indices
    if take == "gather_one":
        indices = [(f"i{n}", np.array([i], np.int64)) for n, i in zip(names, order)]
        return [node for n in names for node in (
            helper.make_node("Gather", ["parts", f"i{n}"], [f"{n}_1"], axis=0),
            helper.make_node("Squeeze", [f"{n}_1", "axis0"], [n]))], [*indices, axis0]
    if take == "slice":  # negative starts and an open end
        bounds = {0: (0, 1), 1: (-2, -1), 2: (2, INT64_MAX)}
        constants = [(f"{end}{n}", np.array([bound], np.int64)) for n, i in zip(names, order)
                     for end, bound in zip("se", bounds[i])]
        return [node for n in names for node in (
            helper.make_node("Slice", ["parts", f"s{n}", f"e{n}", "axis0"], [f"{n}_1"]),
            helper.make_node("Squeeze", [f"{n}_1", "axis0"], [n]))], [*constants, axis0]
    if take == "split":
        outputs = [f"part{i}" for i in range(3)]
        nodes = [helper.make_node("Split", ["parts", "ones"], outputs, axis=0)]
        nodes += [helper.make_node("Squeeze", [outputs[i], "axis0"], [n]) for n, i in zip(names, order)]
        return nodes, [("ones", np.ones(3, np.int64)), axis0]
    # SplitToSequence into ones (keeping the axis), then SequenceAt
    positions = [(f"at{n}", np.array(i, np.int64)) for n, i in zip(names, order)]
    return [helper.make_node("SplitToSequence", ["parts"], ["sequence"], axis=0)] + [
        node for n in names for node in (
            helper.make_node("SequenceAt", ["sequence", f"at{n}"], [f"{n}_1"]),
            helper.make_node("Squeeze", [f"{n}_1", "axis0"], [n]))], [*positions, axis0]


def packed_graph(take: str, *, order=(0, 1, 2), mask: bool = False, merged=(0, 0, HIDDEN),
                 parts_read_elsewhere: bool = False) -> onnx.ModelProto:
    """qkv [b, s, 3 * HIDDEN] reshaped to [0, -1, 3, h, d] and permuted, Q, K and V taken out by
    ``take``, attention (Div by sqrt(d), an added mask), Transpose and Reshape to ``merged``."""
    taking, constants = taken_by(take, order)
    nodes = [
        helper.make_node("Reshape", ["qkv", "packed_shape"], ["packed"]),
        helper.make_node("Transpose", ["packed"], ["parts"], perm=[2, 0, 3, 1, 4]),
        *taking,
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"]),
        *([helper.make_node("Add", ["scaled", "mask"], ["masked"])] if mask else []),
        helper.make_node("Softmax", ["masked" if mask else "scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("Transpose", ["context"], ["heads_last"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["heads_last", "merged_shape"], ["y"]),
    ]
    inputs = [("qkv", FLOAT, ["b", "s", 3 * HIDDEN])]
    inputs += [("mask", FLOAT, ["b", 1, 1, "s"])] if mask else []
    outputs = [("y", ["b", "s", HIDDEN] if len(merged) == 3 else ["rows", HIDDEN])]
    outputs += [("parts", [3, "b", HEADS, "s", HEAD_DIM])] if parts_read_elsewhere else []
    initializers = [("packed_shape", np.array([0, -1, 3, HEADS, HEAD_DIM], np.int64)),
                    ("merged_shape", np.array(merged, np.int64)),
                    ("sqrt_d", np.float32(np.sqrt(HEAD_DIM))), *constants]
    return graph_model(nodes, inputs, outputs, initializers)


GRAPH_SHAPES = [{"b": 2, "s": 5}, {"b": 1, "s": 8}]


@pytest.mark.parametrize("take", ["gather", "gather_one", "slice", "split", "sequence"])
def test_hand_built_packed_split(take):
    original = packed_graph(take)
    fused, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 1, "FusePackedQkvAttention": 1}
    assert op_types(fused) == ["Attention"]
    assert [v.name for v in fused.graph.node(0).inputs] == ["qkv"]
    assert attentions(fused) == [PACKED]
    assert_matches_ort(fused, original, GRAPH_SHAPES)


def test_mask_and_merge_target_with_minus_one():
    original = packed_graph("split", mask=True, merged=(0, 0, -1))
    fused, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 1, "FusePackedQkvAttention": 1}
    assert [v and v.name for v in fused.graph.node(0).inputs] == ["qkv", None, None, "mask"]
    assert attentions(fused) == [{**PACKED, "mask_kind": "additive"}]
    assert_matches_ort(fused, original, GRAPH_SHAPES)


@pytest.mark.parametrize("kwargs", [{"order": (1, 0, 2)}, {"parts_read_elsewhere": True},
                                    {"merged": (-1, HIDDEN)}],
                         ids=["parts_out_of_order", "parts_read_elsewhere", "merge_to_2d"])
def test_left_alone(kwargs):
    """Only the attention itself fuses: the packed split or the merge would change results."""
    original = packed_graph("slice", **kwargs)
    fused, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    assert attentions(fused)[0]["layout"] == "bhsd"
    shapes = [{"b": 2, "s": 5}, {"b": 3, "s": 4}]
    assert_matches_ort(fused, original, shapes)
