"""fuse_attention: every attention block becomes one kiln::Attention.

Torch exports (dynamic batch and sequence, exporter optimisation off and on) of BERT-, ViT- and
GPT-2-style attention, and hand-built ONNX graphs: the graph after the pass (no Softmax left, one
kiln::Attention per block, its attributes, match counts) and its numbers against ONNX Runtime on
the original model at several shapes.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.fuse_attention import fuse_attention
from tests.models.zoo import EncoderLayer

HIDDEN, HEADS = 32, 4
HEAD_DIM = HIDDEN // HEADS
SHAPES = ({"batch": 2, "seq": 5}, {"batch": 3, "seq": 9})


# --- models --------------------------------------------------------------------------------------

def to_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h*d] -> [b, h, s, d], as view + transpose."""
    return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def from_heads(y: torch.Tensor) -> torch.Tensor:
    """[b, h, s, d] -> [b, s, h*d], as transpose + reshape."""
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], HIDDEN)


class Bert(nn.Module):
    """Two encoder layers whose attention adds a padding bias made from ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(HIDDEN, HEADS) for _ in range(2))

    def forward(self, x, attention_mask):
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


class VitAttention(nn.Module):
    """timm's ViT attention: one qkv projection permuted into heads; by SDPA or written out."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        batch, seq, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = (q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, seq, hidden))


class Vit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([VitAttention(sdpa=False), VitAttention(sdpa=True)])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: separate projections split into heads, then one of ways to be causal:
    a registered tril buffer with masked_fill(-inf) ("masked_fill"), torch.where with the dtype's
    minimum and a padding bias added after it ("where_min", as Hugging Face writes it), or SDPA's
    is_causal ("sdpa")."""

    def __init__(self, causal: str, max_positions: int = 16) -> None:
        super().__init__()
        self.causal = causal
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        visible = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("visible", visible.view(1, 1, max_positions, max_positions))

    def forward(self, x, bias=None):
        seq = x.shape[1]
        q, k, v = (to_heads(p(x)) for p in (self.q, self.k, self.v))
        if self.causal == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
            visible = self.visible[:, :, :seq, :seq]
            if self.causal == "masked_fill":
                scores = scores.masked_fill(~visible, float("-inf"))
            else:
                scores = torch.where(visible, scores, torch.finfo(scores.dtype).min) + bias
            y = scores.softmax(-1) @ v
        return self.o(from_heads(y))


class Gpt2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CausalSelfAttention(way) for way in ("masked_fill", "sdpa"))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class PaddedGpt2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = CausalSelfAttention("where_min")

    def forward(self, x, attention_mask):
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.attention(x, bias)


class BooleanMaskSdpa(nn.Module):
    """SDPA with a boolean padding mask (torch decomposes it with a NaN-to-zero softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x, attention_mask):
        q, k, v = (to_heads(p(x)) for p in (self.q, self.k, self.v))
        keep = attention_mask[:, None, None, :].bool()
        return from_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a memory of another length; scale by Mul."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x, memory):
        q, k, v = to_heads(self.q(x)), to_heads(self.k(memory)), to_heads(self.v(memory))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * HEAD_DIM ** -0.5, dim=-1)
        return from_heads(probs @ v)


TOKENS = {"x": (torch.randn(2, 5, HIDDEN), {0: "batch", 1: "seq"})}
MASKED = {**TOKENS, "attention_mask": (torch.ones(2, 5, dtype=torch.int64), {0: "batch", 1: "seq"})}
MEMORY = {**TOKENS, "memory": (torch.randn(2, 7, HIDDEN), {0: "batch", 1: "memory"})}
# name -> (module, {input name: (example, its dynamic dims)})
MODELS = {
    "bert": (Bert, MASKED),
    "vit": (Vit, TOKENS),
    "gpt2": (Gpt2, TOKENS),
    "padded_gpt2": (PaddedGpt2, MASKED),
    "boolean_sdpa": (BooleanMaskSdpa, MASKED),
    "cross": (CrossAttention, MEMORY),
}


@functools.cache
def exported(name: str, optimize: bool) -> onnx.ModelProto:
    """MODELS[name] through torch's dynamo exporter (once per session)."""
    module_type, inputs = MODELS[name]
    torch.manual_seed(0)
    symbols: dict[str, torch.export.Dim] = {}
    dims = tuple({axis: symbols.setdefault(sym, torch.export.Dim(sym, min=2, max=16))
                  for axis, sym in dynamic.items()} for _, dynamic in inputs.values())
    example = tuple(tensor for tensor, _ in inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the exporter reports its progress through logging
        try:
            program = torch.onnx.export(module_type().eval(), example, dynamo=True,
                                        input_names=list(inputs), dynamic_shapes=dims,
                                        optimize=optimize, verbose=False)
        finally:
            logging.disable(logging.NOTSET)
    return program.model_proto


# --- helpers ------------------------------------------------------------------------------------

def fuse(proto: onnx.ModelProto):
    """The model after fuse_attention and the dead-node cleanup the pipeline runs after it."""
    outcome = fuse_attention()(load_onnx(proto))
    RemoveUnusedNodesPass()(outcome.model)
    return outcome.model, outcome.changes


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def attentions(model: ir.Model) -> list[dict]:
    """The attributes of each kiln::Attention, in graph order."""
    return [{k: a.value for k, a in n.attributes.items()}
            for n in model.graph if n.domain == "kiln" and n.op_type == "Attention"]


def random_inputs(proto: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict:
    """Fresh inputs for the graph's inputs: floats away from zero, 0/1 masks with some zeros (never
    a whole row), booleans mostly true; symbolic dims sized from ``sizes``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in tensor.shape.dim]
        if tensor.elem_type == TensorProto.INT64:
            mask = np.ones(shape, np.int64)
            mask[0, -2:] = 0
            inputs[value.name] = mask
        elif tensor.elem_type == TensorProto.BOOL:
            inputs[value.name] = (rng.random(shape) < 0.7) | (np.arange(shape[-1]) == 0)
        else:
            magnitude = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
            inputs[value.name] = magnitude.astype(np.float32)
    return inputs


def assert_matches_ort(fused: ir.Model, original: onnx.ModelProto, shapes=SHAPES,
                       inputs=None) -> None:
    """The fused model, built with kiln (no further fusion), against ORT on the original model:
    max error relative to the largest output magnitude <= 1e-4 (NaN where ORT gives NaN)."""
    engine = kiln.build(ir.serde.serialize_model(fused), device="cpu", opt_level=0)
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed, sizes in enumerate(shapes):
        feeds = inputs(sizes, seed) if inputs else random_inputs(original, sizes, seed)
        expected = session.run(None, feeds)
        got = engine.run(feeds)
        for output, want in zip(original.graph.output, expected):
            have = np.asarray(got[output.name], np.float64)
            assert np.array_equal(np.isnan(have), np.isnan(want)), f"NaNs differ at {sizes}"
            finite = ~np.isnan(want)
            error = np.max(np.abs(have[finite] - want[finite]), initial=0.0)
            assert error <= 1e-4 * np.max(np.abs(want[finite]), initial=1.0), f"{error} at {sizes}"


# --- torch exports ------------------------------------------------------------------------------

OPTIMIZE = pytest.mark.parametrize("optimize", [False, True], ids=["plain", "optimized"])


@OPTIMIZE
def test_bert_attention_with_padding_mask(optimize):
    original = exported("bert", optimize)
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 2}
    assert "Softmax" not in op_types(fused)
    assert attentions(fused) == [{"num_heads": HEADS, "scale": pytest.approx(HEAD_DIM ** -0.5),
                                  "causal": 0, "mask_kind": "additive", "layout": "bsd",
                                  "masked_rows": "nan"}] * 2
    assert_matches_ort(fused, original)


@OPTIMIZE
def test_vit_attention_written_out_and_by_sdpa(optimize):
    """timm splits heads with one permute of the packed qkv projection: the whole block, head split
    and merge included, becomes one attention on the packed projection."""
    original = exported("vit", optimize)
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 2, "FusePackedQkvAttention": 2}
    assert "Softmax" not in op_types(fused)
    assert attentions(fused) == [{"num_heads": HEADS, "scale": pytest.approx(HEAD_DIM ** -0.5),
                                  "causal": 0, "mask_kind": "none", "layout": "bsd_packed",
                                  "masked_rows": "nan"}] * 2
    assert_matches_ort(fused, original)


@OPTIMIZE
def test_gpt2_causal_attention_from_tril_buffer_and_sdpa(optimize):
    original = exported("gpt2", optimize)
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 2}
    types = op_types(fused)
    assert "Softmax" not in types and "Trilu" not in types and "Slice" not in types  # glue gone
    found = attentions(fused)
    assert [(a["causal"], a["mask_kind"]) for a in found] == [(1, "none")] * 2
    assert "causal_fill" not in found[0]  # masked_fill(-inf)
    assert found[1]["causal_fill"] == pytest.approx(np.finfo(np.float32).min)  # torch's SDPA
    assert_matches_ort(fused, original)


@OPTIMIZE
def test_causal_attention_with_finite_fill_then_padding_mask(optimize):
    """Hugging Face's where(tril, scores, min) + padding bias: left-padded rows see no key but keep
    the unfused graph's (finite) numbers."""
    original = exported("padded_gpt2", optimize)
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 1}
    (found,) = attentions(fused)
    assert found["causal"] == 1 and found["mask_kind"] == "additive"
    assert found["causal_fill"] == pytest.approx(np.finfo(np.float32).min)

    def left_padded(sizes, seed):
        feeds = random_inputs(original, sizes, seed)
        feeds["attention_mask"][0] = np.arange(sizes["seq"]) >= 2
        return feeds
    assert_matches_ort(fused, original, inputs=left_padded)


@OPTIMIZE
def test_sdpa_with_boolean_mask_keeps_zero_rows(optimize):
    original = exported("boolean_sdpa", optimize)
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 1}
    assert not {"Softmax", "IsNaN"} & set(op_types(fused))
    (found,) = attentions(fused)
    assert found["mask_kind"] == "additive" and found["masked_rows"] == "zero"
    assert_matches_ort(fused, original)


def test_cross_attention_over_a_memory_of_another_length():
    original = exported("cross", True)
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 1}
    (found,) = attentions(fused)
    assert found["layout"] == "bsd" and found["scale"] == pytest.approx(HEAD_DIM ** -0.5)
    shapes = [{"batch": 2, "seq": 5, "memory": 7}, {"batch": 3, "seq": 4, "memory": 2}]
    assert_matches_ort(fused, original, shapes)


# --- hand-built graphs --------------------------------------------------------------------------

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def graph_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def split_heads(name: str, perm=(0, 2, 1, 3)) -> list[onnx.NodeProto]:
    return [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_heads"]),
            helper.make_node("Transpose", [f"{name}_heads"], [f"{name}_split"], perm=list(perm))]


PROJECTIONS = [("q", FLOAT, ["b", "s", HIDDEN]), ("k", FLOAT, ["b", "t", HIDDEN]),
               ("v", FLOAT, ["b", "t", HIDDEN])]
HEADS_SHAPE = ("heads_shape", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
MERGED_SHAPE = ("merged_shape", np.array([0, 0, HIDDEN], np.int64))
ROOT = np.float32(HEAD_DIM ** -0.25)


def other_exporter_graph() -> onnx.ModelProto:
    """Constant Reshape targets, K^T straight from the split (0,2,3,1), sqrt(scale) on Q and K^T
    with the constant first, the mask added on the left, an Identity before the merge."""
    nodes = [
        *split_heads("q"), *split_heads("k", (0, 2, 3, 1)), *split_heads("v"),
        helper.make_node("Mul", ["root", "q_split"], ["q_scaled"]),
        helper.make_node("Mul", ["k_split", "root"], ["kt_scaled"]),
        helper.make_node("MatMul", ["q_scaled", "kt_scaled"], ["scores"]),
        helper.make_node("Add", ["bias", "scores"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=3),
        helper.make_node("MatMul", ["probs", "v_split"], ["context"]),
        helper.make_node("Transpose", ["context"], ["heads_last"], perm=[0, 2, 1, 3]),
        helper.make_node("Identity", ["heads_last"], ["copied"]),
        helper.make_node("Reshape", ["copied", "merged_shape"], ["y"]),
    ]
    return graph_model(nodes, [*PROJECTIONS, ("bias", FLOAT, ["b", 1, 1, "t"])],
                       [("y", ["b", "s", HIDDEN])], [HEADS_SHAPE, MERGED_SHAPE, ("root", ROOT)])


def test_other_operand_orders_and_a_mask_hiding_every_key():
    """A batch whose bias is -inf everywhere: NaN rows, in ORT and in the fused op alike."""
    original = other_exporter_graph()
    fused, changes = fuse(original)
    assert changes == {"FuseMultiHeadAttention": 1}
    assert op_types(fused) == ["Attention"]
    assert attentions(fused) == [{"num_heads": HEADS, "scale": pytest.approx(ROOT * ROOT),
                                  "causal": 0, "mask_kind": "additive", "layout": "bsd",
                                  "masked_rows": "nan"}]

    def hidden_batch(sizes, seed):
        feeds = random_inputs(original, sizes, seed)
        feeds["bias"][0] = -np.inf
        return feeds
    shapes = [{"b": 2, "s": 3, "t": 4}, {"b": 3, "s": 6, "t": 2}]
    assert_matches_ort(fused, original, shapes, hidden_batch)


def heads_first_graph(*, mask_nodes, mask_inputs=(), initializers=(), fill=-np.inf,
                      extra_outputs=(), batch="b", seq="s") -> onnx.ModelProto:
    """Attention on [b, h, s, d] inputs: Div by sqrt(d), then ``mask_nodes`` from "scaled" to
    "masked", Softmax, P @ V."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"]),
        *mask_nodes,
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    inputs = [(name, FLOAT, [batch, HEADS, seq, HEAD_DIM]) for name in "qkv"]
    outputs = [("y", [batch, HEADS, seq, HEAD_DIM]), *extra_outputs]
    constants = [("sqrt_d", np.float32(math.sqrt(HEAD_DIM))), ("fill", np.float32(fill))]
    return graph_model(nodes, [*inputs, *mask_inputs], outputs, [*constants, *initializers])


HEADS_FIRST_SHAPES = [{"b": 2, "s": 5}, {"b": 1, "s": 8}]


def test_boolean_mask_marking_hidden_keys():
    """Where(Not(keep), -inf, scores): the Not goes with the match; a row without keys is NaN."""
    original = heads_first_graph(
        mask_nodes=[helper.make_node("Not", ["keep"], ["hide"]),
                    helper.make_node("Where", ["hide", "fill", "scaled"], ["masked"])],
        mask_inputs=[("keep", BOOL, ["b", 1, "s", "s"])])
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    assert op_types(fused) == ["Attention"]
    assert [n.name for n in fused.graph.node(0).inputs] == ["q", "k", "v", "keep"]
    assert attentions(fused) == [{"num_heads": HEADS, "scale": pytest.approx(HEAD_DIM ** -0.5),
                                  "causal": 0, "mask_kind": "boolean", "layout": "bhsd",
                                  "masked_rows": "nan"}]

    def one_row_hidden(sizes, seed):
        feeds = random_inputs(original, sizes, seed)
        feeds["keep"][0, 0, 1] = False
        return feeds
    assert_matches_ort(fused, original, HEADS_FIRST_SHAPES, one_row_hidden)


def sliced_to_sequence(name: str) -> list[onnx.NodeProto]:
    """``name`` [1, 1, 16, 16] cut to [1, 1, s, s] with s from Q's shape."""
    return [
        helper.make_node("Shape", ["q"], ["length"], start=2, end=3),
        helper.make_node("Slice", [name, "zeros", "length", "last_axes"], [f"{name}_rows"]),
        helper.make_node("Slice", [f"{name}_rows", "zeros", "length", "columns"], [f"{name}_cut"]),
    ]


SLICE_BOUNDS = [("zeros", np.array([0], np.int64)), ("last_axes", np.array([2], np.int64)),
                ("columns", np.array([3], np.int64))]


def test_constant_upper_triangle_of_minus_infinity_is_causal():
    upper = np.triu(np.full((16, 16), -np.inf, np.float32), 1).reshape(1, 1, 16, 16)
    original = heads_first_graph(
        mask_nodes=[*sliced_to_sequence("upper"),
                    helper.make_node("Add", ["scaled", "upper_cut"], ["masked"])],
        initializers=[("upper", upper), *SLICE_BOUNDS])
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    assert op_types(fused) == ["Attention"]
    (found,) = attentions(fused)
    assert found["causal"] == 1 and found["mask_kind"] == "none"
    assert_matches_ort(fused, original, HEADS_FIRST_SHAPES)


@pytest.mark.parametrize("repeated", [True, False], ids=["same-triangle", "batches-differ"])
def test_mask_folded_per_batch_is_causal_when_every_batch_has_the_triangle(repeated):
    """transformers' masks, folded at a static shape: [batch, 1, s, s] of 0 and float32's lowest."""
    s, lowest = 5, np.finfo(np.float32).min
    masks = np.stack([np.triu(np.full((s, s), lowest, np.float32), 1)] * 2)[:, None]
    if not repeated:
        masks[1, 0, 3, 1] = lowest  # one more key hidden in the second batch: not causal
    original = heads_first_graph(
        mask_nodes=[helper.make_node("Add", ["scaled", "folded"], ["masked"])],
        initializers=[("folded", masks)], batch=2, seq=s)
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    (found,) = attentions(fused)
    assert (found["causal"], found["mask_kind"]) == ((1, "none") if repeated else (0, "additive"))
    assert_matches_ort(fused, original, [{}])


def test_constant_band_is_a_boolean_mask_not_a_causal_one():
    band = np.tri(16, 16, dtype=bool) & ~np.tri(16, 16, -3, dtype=bool)
    original = heads_first_graph(
        mask_nodes=[*sliced_to_sequence("band"),
                    helper.make_node("Where", ["band_cut", "scaled", "fill"], ["masked"])],
        initializers=[("band", band.reshape(1, 1, 16, 16)), *SLICE_BOUNDS])
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    (found,) = attentions(fused)
    assert found["causal"] == 0 and found["mask_kind"] == "boolean"
    assert_matches_ort(fused, original, HEADS_FIRST_SHAPES)


def test_causal_with_finite_fill_then_boolean_mask_of_hidden_keys():
    """Where(tril, scores, min), then Where(hide, -inf, ...): the fused op gets Not(hide) and adds
    min to the causally hidden keys, so rows whose visible keys are all hidden stay finite."""
    lower = np.tri(16, 16, dtype=bool).reshape(1, 1, 16, 16)
    original = heads_first_graph(
        mask_nodes=[*sliced_to_sequence("lower"),
                    helper.make_node("Where", ["lower_cut", "scaled", "lowest"], ["causal"]),
                    helper.make_node("Where", ["hide", "fill", "causal"], ["masked"])],
        mask_inputs=[("hide", BOOL, ["b", 1, 1, "s"])],
        initializers=[("lower", lower), ("lowest", np.finfo(np.float32).min), *SLICE_BOUNDS])
    fused, changes = fuse(original)
    assert changes == {"FuseScaledDotProductAttention": 1}
    assert op_types(fused) == ["Not", "Attention"]
    (found,) = attentions(fused)
    assert found["causal"] == 1 and found["mask_kind"] == "boolean"
    assert found["causal_fill"] == pytest.approx(np.finfo(np.float32).min)
    assert_matches_ort(fused, original, HEADS_FIRST_SHAPES)


@pytest.mark.parametrize("case", ["scale_not_constant", "probabilities_read_elsewhere",
                                  "mask_grows_scores", "finite_causal_fill_after_mask"])
def test_left_alone(case):
    """What fusing would change is left as it is."""
    kwargs = {"mask_nodes": [helper.make_node("Identity", ["scaled"], ["masked"])]}
    if case == "scale_not_constant":
        kwargs = {"mask_nodes": [helper.make_node("Mul", ["scaled", "temperature"], ["masked"])],
                  "mask_inputs": [("temperature", FLOAT, [1])]}
    elif case == "probabilities_read_elsewhere":
        kwargs["extra_outputs"] = [("probs", ["b", HEADS, "s", "s"])]
    elif case == "mask_grows_scores":
        kwargs = {"mask_nodes": [helper.make_node("Add", ["scaled", "bias"], ["masked"])],
                  "mask_inputs": [("bias", FLOAT, [2, "b", HEADS, "s", "s"])]}
    else:  # a finite fill replaces the padding bias added before it: not what -inf would do
        lower = np.tri(16, 16, dtype=bool).reshape(1, 1, 16, 16)
        mask_nodes = [helper.make_node("Add", ["scaled", "bias"], ["biased"]),
                      *sliced_to_sequence("lower"),
                      helper.make_node("Where", ["lower_cut", "biased", "fill"], ["masked"])]
        kwargs = {"mask_nodes": mask_nodes, "mask_inputs": [("bias", FLOAT, ["b", 1, 1, "s"])],
                  "fill": np.finfo(np.float32).min,
                  "initializers": [("lower", lower), *SLICE_BOUNDS]}
    fused, changes = fuse(heads_first_graph(**kwargs))
    assert not changes and "Softmax" in op_types(fused)


# --- ONNX Attention -----------------------------------------------------------------------------

def onnx_attention(*, rank: int, mask: int | None = None, is_causal: int = 0, kv_heads: int = HEADS,
                   past: bool = False) -> onnx.ModelProto:
    """One Attention-23 node on 3-D (heads in attributes) or 4-D inputs, Q of length s, K/V of t."""
    def shape(length, heads=HEADS):
        return ["b", length, heads * HEAD_DIM] if rank == 3 else ["b", heads, length, HEAD_DIM]
    inputs = [("q", FLOAT, shape("s")), ("k", FLOAT, shape("t", kv_heads)),
              ("v", FLOAT, shape("t", kv_heads))]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(("mask", mask, ["b", 1, "s", "t"]))
        names.append("mask")
    if past:
        inputs += [(name, FLOAT, ["b", HEADS, "p", HEAD_DIM]) for name in ("past_key", "past_v")]
        names += [""] * (mask is None) + ["past_key", "past_v"]
    heads = {"q_num_heads": HEADS, "kv_num_heads": kv_heads} if rank == 3 else {}
    node = helper.make_node("Attention", names, ["y"], is_causal=is_causal, scale=0.3, **heads)
    return graph_model([node], inputs, [("y", shape("s"))], opset=23)


ATTENTION_SHAPES = [{"b": 2, "s": 5, "t": 5}, {"b": 3, "s": 4, "t": 6}]


@pytest.mark.parametrize("rank, mask, is_causal",
                         [(3, None, 0), (3, BOOL, 1), (4, FLOAT, 1), (4, BOOL, 0)])
def test_onnx_attention_becomes_kiln_attention(rank, mask, is_causal):
    original = onnx_attention(rank=rank, mask=mask, is_causal=is_causal)
    fused, changes = fuse(original)
    assert changes == {"ReplaceOnnxAttention": 1}
    mask_kind = {None: "none", BOOL: "boolean", FLOAT: "additive"}[mask]
    assert attentions(fused) == [{"num_heads": HEADS, "scale": pytest.approx(0.3),
                                  "causal": is_causal, "mask_kind": mask_kind,
                                  "layout": "bsd" if rank == 3 else "bhsd", "masked_rows": "zero"}]
    assert_matches_ort(fused, original, ATTENTION_SHAPES)


@pytest.mark.parametrize("kwargs", [{"rank": 3, "kv_heads": 2}, {"rank": 4, "kv_heads": 2},
                                    {"rank": 4, "past": True}],
                         ids=["grouped_3d", "grouped_4d", "kv_cache"])
def test_onnx_attention_left_alone(kwargs):
    fused, changes = fuse(onnx_attention(**kwargs))
    assert not changes and op_types(fused) == ["Attention"]
