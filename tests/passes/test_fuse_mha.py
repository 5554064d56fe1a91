"""fuse_mha: torch.nn.MultiheadAttention (torchvision's ViT encoder block) becomes in-projection ->
one kiln::Attention -> out-projection.

Modules exported inside the tests by both of torch's exporters (dynamo, its optimisation on and
off, and TorchScript), with a symbolic batch and with a static batch of one, through the real
level-3 pipeline: the graph after (one kiln::Attention per block, no Softmax and no head split or
merge glue left, match counts) and its numbers against ONNX Runtime on the original model. Hand
built graphs cover the other way to move the parts first and projections left alone.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.pipeline import optimize
from tests.models import zoo
from tests.passes.test_fuse_attention import FLOAT, attentions, graph_model, random_inputs

WIDTH, HEADS, TOKENS = 64, 4, 17
HEAD_DIM = WIDTH // HEADS
GLUE = {"Softmax", "Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Split", "Slice"}
PACKED = {"num_heads": HEADS, "scale": pytest.approx(HEAD_DIM ** -0.5), "causal": 0,
          "mask_kind": "none", "layout": "bsd_packed", "masked_rows": "nan"}
RTOL = 1e-5


# --- models ---------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block up to its MLP: ln_1, self-attention by
    nn.MultiheadAttention (batch-first, no attention weights), residual. ``memory`` attends to
    the input instead (cross-attention); ``causal`` passes a causal attn_mask. Random biases
    unless ``zero_biases`` (nn.MultiheadAttention's own start, which folding drops)."""

    def __init__(self, memory: bool = False, causal: bool = False, zero_biases: bool = False) -> None:
        super().__init__()
        self.memory, self.causal = memory, causal
        self.ln_1 = nn.LayerNorm(WIDTH, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(WIDTH, HEADS, dropout=0.0, batch_first=True)
        with torch.no_grad():
            for p in (self.ln_1.weight, self.ln_1.bias, self.self_attention.in_proj_bias,
                      self.self_attention.out_proj.bias)[:2 if zero_biases else 4]:
                p.uniform_(-0.5, 0.5)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        if self.memory:
            x, _ = self.self_attention(x, input, input, need_weights=False)
        elif self.causal:
            tokens = input.shape[1]
            mask = torch.triu(torch.full((tokens, tokens), float("-inf")), diagonal=1)
            x, _ = self.self_attention(x, x, x, attn_mask=mask, need_weights=False)
        else:
            x, _ = self.self_attention(x, x, x, need_weights=False)
        return x + input


MODELS = {
    "one_block": EncoderBlock,
    "two_blocks": lambda: nn.Sequential(EncoderBlock(), EncoderBlock()),
    "cross": lambda: EncoderBlock(memory=True),
    "causal": lambda: EncoderBlock(causal=True),
    "zero_biases": lambda: EncoderBlock(zero_biases=True),
}
EXPORTERS = ["dynamo", "dynamo_plain", "torchscript"]  # dynamo_plain: its optimisation off


@functools.cache
def exported(name: str, exporter: str, batch: int | None = None) -> onnx.ModelProto:
    """MODELS[name] on x [batch, TOKENS, WIDTH], the batch symbolic when None (once)."""
    torch.manual_seed(0)
    module = MODELS[name]().eval()
    example = (torch.randn(batch or 2, TOKENS, WIDTH),)
    if exporter != "torchscript":
        dynamic = {} if batch else {"x": {0: "batch"}}
        return zoo.export_proto(module, example, ["x"], dynamic, exporter == "dynamo", dim_range=(1, 16))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(module, example, buffer, dynamo=False, input_names=["x"],
                              output_names=["y"], opset_version=17,
                              dynamic_axes=None if batch else {"x": {0: "batch"}, "y": {0: "batch"}})
        finally:
            logging.disable(logging.NOTSET)
    return onnx.load_from_string(buffer.getvalue())


# --- helpers --------------------------------------------------------------------------------------

def optimized(proto: onnx.ModelProto) -> tuple[ir.Model, dict]:
    """The model after the level-3 pipeline, and the matches of the attention passes."""
    model, records = optimize(load_onnx(proto), 3)
    changes = {}
    for record in records:
        if record.name in ("FuseAttention", "FuseMultiheadAttention"):
            changes.update(record.changes)
    return model, changes


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


def assert_matches_ort(model: ir.Model, original: onnx.ModelProto, batches=(2, 3)) -> None:
    """kiln's engine of ``model`` against ORT on ``original``: max error <= RTOL of the largest
    output magnitude, on fresh random inputs (symbolic dims sized ``batch``, ``s``, ``t``)."""
    engine = kiln.build(ir.serde.serialize_model(model), device="cpu", opt_level=0)
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed, batch in enumerate(batches):
        feeds = random_inputs(original, {"batch": batch, "b": batch, "s": 5, "t": 7}, seed)
        for output, want in zip(original.graph.output, session.run(None, feeds)):
            have = np.asarray(engine.run(feeds)[output.name], np.float64)
            error = np.max(np.abs(have - want))
            assert error <= RTOL * np.max(np.abs(want)), f"{error} at batch {batch}"


# --- torch exports through the pipeline -----------------------------------------------------------

EXPORTER = pytest.mark.parametrize("exporter", EXPORTERS)


@EXPORTER
@pytest.mark.parametrize("name, blocks", [("one_block", 1), ("two_blocks", 2)])
def test_blocks_become_projection_attention_projection(exporter, name, blocks):
    original = exported(name, exporter)
    model, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": blocks, "FuseSequenceFirstAttention": blocks,
                       "CancelTransposesAroundProjection": 2 * blocks}
    assert attentions(model) == [PACKED] * blocks
    # LayerNorm -> QKV FusedMatMul -> Attention -> out FusedMatMul (+ residual), per block
    assert op_counts(model) == {"LayerNorm": blocks, "FusedMatMul": 2 * blocks, "Attention": blocks}
    assert_matches_ort(model, original)


@EXPORTER
def test_batch_of_one(exporter):
    """A static batch of one: no exporter turns the batch transposes into anything else."""
    original = exported("two_blocks", exporter, batch=1)
    model, changes = optimized(original)
    assert changes["FuseSequenceFirstAttention"] == 2
    assert attentions(model) == [PACKED] * 2
    assert not GLUE & set(op_counts(model))
    assert_matches_ort(model, original, batches=(1,))


def test_shape_inference_knows_the_fused_values():
    """The rewrites annotate the values they make: the attention's and the projections' outputs
    keep the symbolic batch."""
    model, _ = optimized(exported("one_block", "dynamo"))
    for node in model.graph:
        if node.op_type in ("Attention", "FusedMatMul"):
            dims = [d if isinstance(d, int) else d.value for d in node.outputs[0].shape]
            assert dims[:2] == ["batch", TOKENS]


def test_kiln_builds_the_exported_model():
    """kiln.build runs the whole pipeline on the exported model and matches ORT."""
    original = exported("two_blocks", "dynamo")
    engine = kiln.build(original, device="cpu")
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_inputs(original, {"batch": 3}, seed=7)
    (want,) = session.run(None, feeds)
    have = np.asarray(engine.run(feeds)[original.graph.output[0].name])
    assert np.max(np.abs(have - want)) <= RTOL * np.max(np.abs(want))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_zero_biases_leave_no_weight_transpose(exporter):
    """Without biases the in-projection stays a MatMul, and the out-projection's Gemm becomes a
    FusedMatMul on its weight as it is (with the residual): no Transpose is left to run."""
    original = exported("zero_biases", exporter)
    model, _ = optimized(original)
    assert op_counts(model) == {"LayerNorm": 1, "MatMul": 1, "Attention": 1, "FusedMatMul": 1}
    assert_matches_ort(model, original)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_causal_mask(exporter):
    original = exported("causal", exporter)
    model, changes = optimized(original)
    assert changes["FuseSequenceFirstAttention"] == 1
    assert attentions(model) == [{**PACKED, "causal": 1}]
    assert op_counts(model) == {"LayerNorm": 1, "FusedMatMul": 2, "Attention": 1}
    assert_matches_ort(model, original)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_cross_attention_takes_q_k_v_apart(exporter):
    """Q projected from the normalized input, K and V packed from the raw one: not three parts of
    one projection, so the attention takes them one by one."""
    original = exported("cross", exporter)
    model, changes = optimized(original)
    assert changes["FuseSequenceFirstAttention"] == 1
    assert attentions(model) == [{**PACKED, "layout": "bsd"}]
    assert "Softmax" not in op_counts(model)
    assert_matches_ort(model, original)


# --- hand-built graphs ----------------------------------------------------------------------------

def packed_graph(*, bias_shape=(3 * WIDTH,), restored=(5, -1, WIDTH)) -> onnx.ModelProto:
    """nn.MultiheadAttention's graph with the parts moved first by one Transpose(2, 0, 1, 3) and
    the attention written out, on x [b, 5, WIDTH]; the in-projection bias of ``bias_shape``, the
    out-projection's rows reshaped to ``restored``."""
    rng = np.random.default_rng(0)
    weights = [("w_in", rng.standard_normal((WIDTH, 3 * WIDTH)).astype(np.float32) * 0.1),
               ("b_in", rng.standard_normal(bias_shape).astype(np.float32)),
               ("w_out", rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.1),
               ("b_out", rng.standard_normal(WIDTH).astype(np.float32)),
               ("parts_shape", np.array([0, 0, 3, WIDTH], np.int64)),
               ("flat_heads", np.array([0, -1, HEAD_DIM], np.int64)),
               ("heads", np.array([-1, HEADS, 5, HEAD_DIM], np.int64)),
               ("flat", np.array([-1, WIDTH], np.int64)),
               ("restored", np.array(restored, np.int64)),
               ("scale", np.float32(HEAD_DIM ** -0.5))]
    weights += [(f"i{i}", np.array(i, np.int64)) for i in range(3)]
    node = helper.make_node
    nodes = [node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             node("MatMul", ["xt", "w_in"], ["proj"]),
             node("Add", ["proj", "b_in"], ["biased"]),
             node("Reshape", ["biased", "parts_shape"], ["unflat"]),
             node("Transpose", ["unflat"], ["parts"], perm=[2, 0, 1, 3])]
    for i, name in enumerate("qkv"):
        nodes += [node("Gather", ["parts", f"i{i}"], [f"{name}_sb"], axis=0),
                  node("Reshape", [f"{name}_sb", "flat_heads"], [f"{name}_flat"]),
                  node("Transpose", [f"{name}_flat"], [f"{name}_bh"], perm=[1, 0, 2]),
                  node("Reshape", [f"{name}_bh", "heads"], [name])]
    nodes += [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              node("MatMul", ["q", "kt"], ["scores"]),
              node("Mul", ["scores", "scale"], ["scaled"]),
              node("Softmax", ["scaled"], ["probs"], axis=-1),
              node("MatMul", ["probs", "v"], ["context"]),
              node("Transpose", ["context"], ["merged"], perm=[2, 0, 1, 3]),
              node("Reshape", ["merged", "flat"], ["rows"]),
              node("Gemm", ["rows", "w_out", "b_out"], ["out_rows"]),
              node("Reshape", ["out_rows", "restored"], ["out_sb"]),
              node("Transpose", ["out_sb"], ["y"], perm=[1, 0, 2])]
    return graph_model(nodes, [("x", FLOAT, ["b", 5, WIDTH])], [("y", ["b", 5, WIDTH])], weights)


def test_parts_moved_first_by_one_transpose():
    original = packed_graph()
    model, changes = optimized(original)
    assert changes == {"FuseScaledDotProductAttention": 1, "FuseSequenceFirstAttention": 1,
                       "CancelTransposesAroundProjection": 2}
    assert attentions(model) == [{**PACKED, "scale": pytest.approx(HEAD_DIM ** -0.5)}]
    assert op_counts(model) == {"FusedMatMul": 2, "Attention": 1}
    assert_matches_ort(model, original)


@pytest.mark.parametrize("case", ["bias_along_the_sequence", "rows_restored_batch_major"])
def test_projection_left_between_its_transposes(case):
    """A bias with one value per position of the sequence is not one of the in-projection's
    columns; out-projection rows reshaped to [b, s] are not the [s, b] they were flattened from
    (the same elements only where b = s). The transposes around that projection stay; the
    attention still fuses."""
    if case == "bias_along_the_sequence":
        original, batches = packed_graph(bias_shape=(5, 1, 3 * WIDTH)), (2, 3)
    else:
        original, batches = packed_graph(restored=(-1, 5, WIDTH)), (5,)
    model, changes = optimized(original)
    assert changes["FuseSequenceFirstAttention"] == 1
    assert changes["CancelTransposesAroundProjection"] == 1  # the other projection's
    assert op_counts(model)["Transpose"] == 2
    assert "Softmax" not in op_counts(model)
    assert_matches_ort(model, original, batches)
