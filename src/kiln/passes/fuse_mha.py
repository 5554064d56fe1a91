"""``torch.nn.MultiheadAttention`` as exporters emit it, fused into one ``kiln::Attention``
(``kiln.ops.fused_attention``) between its two projections.

nn.MultiheadAttention (torchvision's ViT encoder uses it) computes sequence-first. A batch-first
module transposes its input x [b, s, E] to [s, b, E] (Transpose(1, 0, 2)), projects it by one
packed in_proj_weight to [s, b, 3E], unflattens that to [s, b, 3, E] and moves the 3 first
(Unsqueeze(0), Transpose(3, 1, 2, 0, 4), Squeeze(3); or one Transpose(2, 0, 1, 3)), takes Q, K and
V out (Gather 0, 1 and 2) and splits each into heads as Reshape [s, b*h, d], Transpose(1, 0, 2),
Reshape [b, h, s, d]. After the attention it merges the heads back as Transpose(2, 0, 1, 3) and
Reshape [s*b, E], projects that by out_proj (a Gemm), reshapes it to [s, b, E] and transposes it
back to batch-first.

``fuse_attention`` has made the attention itself a heads-first kiln::Attention by then. Rules, in
order:

- :class:`FuseSequenceFirstAttention`: the sequence-first head splits, that attention and the
  head merge become ``layout="bsd_packed"`` on the batch-first projection when Q, K and V are the
  three parts of one packed projection, else ``layout="bsd"`` on the batch-first Q, K and V. The
  batch-first operands and the result's way back to sequence-first are Transpose(1, 0, 2)s, which
- :class:`CancelTransposesAroundProjection` takes out of the projections: Transpose(1, 0, 2) of
  the projection (MatMul by a matrix, with its bias, or a Gemm between the Reshapes that flatten
  [s, b] and restore it) of Transpose(1, 0, 2)(x) is that projection of x (a Gemm's as the
  ``kiln::FusedMatMul`` it would have become).

What is left is in-projection -> kiln::Attention -> out-projection, for ``fuse_matmul``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.passes.fuse_attention import (
    SEQUENCE_FIRST_HEADS,
    Dim,
    _dims,
    _head_split,
    _is_unnamed,
    _part_of_three,
    _perm,
    _sequence_first_split,
    _SequenceFirstSplit,
    _squeezed_axes,
    _with_glue,
)
from kiln.passes.fuse_matmul import FusedProduct
from kiln.passes.rewrite import KILN_DOMAIN, Match, RewritePass, RewriteRule, initializer, kiln_node, producer

SWAP_FIRST_TWO = (1, 0, 2)  # [b, s, E] <-> [s, b, E]
SEQUENCE_FIRST_MERGE = (2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d]
PARTS_FIRST = (2, 0, 1, 3)  # [s, b, 3, E] -> [3, s, b, E]
PARTS_SWAPPED_FIRST = (3, 1, 2, 0, 4)  # [1, s, b, 3, E] -> [3, s, b, 1, E]


def fuse_mha() -> RewritePass:
    return RewritePass(FuseSequenceFirstAttention(), CancelTransposesAroundProjection(),
                       name="FuseMultiheadAttention")


def _transposed(value: ir.Value, perm: tuple[int, ...], name: str) -> ir.Node:
    return ir.Node("", "Transpose", [value], [ir.AttrInt64s("perm", list(perm))], name=name)


def _annotate(value: ir.Value, dims: list[Dim], dtype: ir.DataType | None) -> None:
    """Give a value a rewrite makes the shape and type worked out for it (later rules read them)."""
    value.shape = ir.Shape([None if _is_unnamed(d) else d for d in dims])
    if dtype is not None:
        value.type = ir.TensorType(dtype)


# --- the sequence-first head split and merge ---------------------------------------------------

def _heads_of(value: ir.Value) -> _SequenceFirstSplit | None:
    """``value`` [b, h, s, d] as a sequence-first head split of a [s, b, h*d] source: torch's three
    nodes, or Reshape to [s, b, h, d] and Transpose(1, 2, 0, 3) (fuse_attention's K from a Kᵀ that
    came straight from torch's split)."""
    split = _sequence_first_split(value)
    if split is not None:
        return split
    found = _head_split(value, SEQUENCE_FIRST_HEADS)
    if found is None:
        return None
    return _SequenceFirstSplit(found.source, found.heads, found.head_dim,
                               [found.reshape, found.transpose])


def _packed_projection(sources: list[ir.Value]) -> tuple[ir.Value, list[ir.Node]] | None:
    """The [s, b, 3E] projection whose parts 0, 1 and 2 ``sources`` are, taken out as
    nn.MultiheadAttention does (see the module's docstring), and the nodes that take them out."""
    parts = [_part_of_three(x, rank=4) for x in sources]
    if None in parts or any(p.whole is not parts[0].whole for p in parts) \
            or [p.index for p in parts] != [0, 1, 2]:
        return None
    moved = _parts_moved_first(parts[0].whole)
    if moved is None:
        return None
    reshape, nodes = moved
    projection, unflattened = _dims(reshape.inputs[0]), _dims(reshape.outputs[0])
    if projection is None or unflattened is None or len(projection) != 3 or len(unflattened) != 4:
        return None
    if unflattened[:3] != [*projection[:2], 3]:  # then the last axis splits as 3 parts of E
        return None
    return reshape.inputs[0], [*(n for p in parts for n in p.nodes), *nodes, reshape]


def _parts_moved_first(value: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """``value`` [3, s, b, E] = the parts axis of a Reshape's [s, b, 3, E] moved first: the
    Reshape and the nodes after it."""
    transpose = producer(value, "Transpose")
    if transpose is not None:
        reshape = producer(transpose.inputs[0], "Reshape")
        if reshape is None or _perm(transpose, 4) != PARTS_FIRST:
            return None
        return reshape, [transpose]
    squeeze = producer(value, "Squeeze")
    transpose = squeeze and producer(squeeze.inputs[0], "Transpose")
    unsqueeze = transpose and producer(transpose.inputs[0], "Unsqueeze")
    reshape = unsqueeze and producer(unsqueeze.inputs[0], "Reshape")
    if reshape is None or _perm(transpose, 5) != PARTS_SWAPPED_FIRST:
        return None
    # Squeeze and Unsqueeze name their axes alike (an input, or an attribute before opset 13).
    if _squeezed_axes(squeeze) not in ([3], [-2]) or _squeezed_axes(unsqueeze) not in ([0], [-5]):
        return None
    return reshape, [squeeze, transpose, unsqueeze]


def _one_of_equal(pair: list[Dim], expected: list[Dim]) -> bool:
    """Whether ``pair`` [p, q] is ``expected`` [p', q'], given that p * q = p' * q': when p = p'
    or q = q'."""
    return pair[0] == expected[0] or pair[1] == expected[1]


class FuseSequenceFirstAttention(RewriteRule):
    """nn.MultiheadAttention's head splits, a heads-first kiln::Attention and the head merge:
    ``layout="bsd_packed"`` on the batch-first packed projection, or ``layout="bsd"`` on the
    batch-first Q, K and V; its result transposed back to sequence-first. Anchored at the merge."""

    anchor = "Reshape"

    def match(self, node: ir.Node) -> Match | str:
        merged, identities = node.inputs[0], []
        while (identity := producer(merged, "Identity")) is not None:
            merged, identities = identity.inputs[0], [*identities, identity]
        transpose = producer(merged, "Transpose")
        if transpose is None or _perm(transpose, 4) != SEQUENCE_FIRST_MERGE:
            return "not a sequence-first head merge (Transpose(2,0,1,3) then Reshape)"
        attention = producer(transpose.inputs[0], "Attention", KILN_DOMAIN)
        if attention is None or attention.attributes.get_string("layout", "bsd") != "bhsd":
            return "the head merge does not take a heads-first kiln::Attention"
        q, k, v, mask = (list(attention.inputs) + [None])[:4]
        splits = [_heads_of(x) if x is not None else None for x in (q, k, v)]
        if None in splits:
            return "Q, K or V is not split into heads sequence-first"
        query, key, value = splits
        if not query.heads == key.heads == value.heads or query.head_dim != key.head_dim:
            return "Q, K and V split into different heads"
        sources = [_dims(split.source) for split in splits]  # [s, b, h*d] each (as split)
        if sources[0][1] != sources[1][1] or sources[1][1] != sources[2][1] \
                or sources[1][0] != sources[2][0]:
            return "Q, K and V do not share the batch, or K and V the sequence"
        width = value.heads * value.head_dim
        out = _dims(node.outputs[0])
        if out is None or len(out) not in (2, 3) or out[-1] != width \
                or len(out) == 3 and not _one_of_equal(out[:2], sources[0][:2]):
            return "the head merge does not give [s, b, h * d] or [s * b, h * d]"
        packed = _packed_projection([split.source for split in splits])
        nodes = [n for split in splits for n in split.nodes]
        nodes += [attention, transpose, *identities, node, *(packed[1] if packed else ())]
        kept = [packed[0]] if packed else [split.source for split in splits]
        return Match(_with_glue(nodes, [*kept, mask]), [node.outputs[0]], {
            "attention": attention, "kept": kept, "kept_dims": [_dims(x) for x in kept],
            "mask": mask, "heads": query.heads, "width": width, "flat": len(out) == 2,
        })

    def rewrite(self, match: Match) -> list[ir.Node]:
        found = match.bindings
        attention, mask, width = found["attention"], found["mask"], found["width"]
        name, dtype = attention.name or "attention", attention.outputs[0].dtype
        nodes = []
        for i, (x, (seq, batch, columns)) in enumerate(zip(found["kept"], found["kept_dims"])):
            nodes.append(_transposed(x, SWAP_FIRST_TWO, f"{name}/batch_first_{i}"))
            _annotate(nodes[-1].outputs[0], [batch, seq, columns], x.dtype or dtype)
        inputs = [n.outputs[0] for n in nodes]
        if len(inputs) == 1:
            layout, inputs = "bsd_packed", inputs if mask is None else [*inputs, None, None, mask]
        else:
            layout, inputs = "bsd", [*inputs, mask]
        attributes = {key: attr.value for key, attr in attention.attributes.items()}
        fused = kiln_node("Attention", inputs,
                          {**attributes, "num_heads": found["heads"], "layout": layout}, name=name)
        seq, batch = found["kept_dims"][0][:2]  # the queries'
        _annotate(fused.outputs[0], [batch, seq, width], dtype)
        back = _transposed(fused.outputs[0], SWAP_FIRST_TWO, f"{name}/sequence_first")
        nodes += [fused, back]
        if found["flat"]:
            _annotate(back.outputs[0], [seq, batch, width], dtype)
            target = initializer(attention.graph, f"{name}/flat_shape", np.array([-1, width], np.int64))
            nodes.append(ir.Node("", "Reshape", [back.outputs[0], target], name=f"{name}/flat"))
        return nodes


# --- projections between transposes --------------------------------------------------------------

@dataclass
class _Projection:
    """``x @ W + bias`` over x's last axis: a MatMul by a matrix with a bias Add, or a Gemm
    (``gemm``, whose transB, alpha and beta apply); ``columns`` is the size of its last axis."""

    input: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    columns: Dim
    nodes: list[ir.Node]
    gemm: ir.Node | None = None


def _projection(value: ir.Value, rank: int) -> _Projection | None:
    """The projection making ``value``, a ``rank``-D result (a Gemm's is 2-D)."""
    gemm = producer(value, "Gemm") if rank == 2 else None
    if gemm is not None:
        attrs = gemm.attributes
        if attrs.get_int("transA", 0):
            return None
        weight, bias = (list(gemm.inputs) + [None])[1:3]
        if attrs.get_float("beta", 1.0) == 0.0:
            bias = None  # beta * C is zero
        matrix = _dims(weight)
        if matrix is None or len(matrix) != 2:
            return None
        columns = matrix[0] if attrs.get_int("transB", 0) else matrix[1]
        if bias is not None and not _along_last_axis(bias, columns, rank):
            return None
        return _Projection(gemm.inputs[0], weight, bias, columns, [gemm], gemm)
    add, bias, product = producer(value, "Add"), None, value
    if add is not None:
        a, b = add.inputs
        product, bias = (a, b) if producer(a, "MatMul") is not None else (b, a)
    matmul = producer(product, "MatMul")
    matrix = matmul and _dims(matmul.inputs[1])
    if matrix is None or len(matrix) != 2:
        return None
    if bias is not None and not _along_last_axis(bias, matrix[1], rank):
        return None
    return _Projection(matmul.inputs[0], matmul.inputs[1], bias, matrix[1],
                       [matmul, *([add] if add else ())])


def _along_last_axis(bias: ir.Value, columns: Dim, rank: int) -> bool:
    """True when ``bias`` varies along the last axis only and keeps a ``rank``-D product's rank."""
    dims = _dims(bias)
    return dims is not None and len(dims) <= rank and all(d == 1 for d in dims[:-1]) \
        and (not dims or dims[-1] in (1, columns))


class CancelTransposesAroundProjection(RewriteRule):
    """Transpose(1,0,2)(P(Transpose(1,0,2)(x))) -> P(x), for P a projection of the last axis: a
    MatMul by a matrix (with its bias Add) on [s, b, E], or a Gemm between a Reshape flattening
    [s, b] and one restoring it. Anchored at the outer Transpose."""

    anchor = "Transpose"

    def match(self, node: ir.Node) -> Match | str:
        if _perm(node, 3) != SWAP_FIRST_TWO:
            return "not Transpose(1,0,2)"
        unflatten = producer(node.inputs[0], "Reshape")
        value = unflatten.inputs[0] if unflatten is not None else node.inputs[0]
        projection = _projection(value, 2 if unflatten is not None else 3)
        if projection is None:
            return "Transpose(1,0,2) does not take a projection (MatMul by a matrix, or Gemm)"
        x, flatten = projection.input, None
        if unflatten is not None:
            flatten = producer(x, "Reshape")
            x = flatten.inputs[0] if flatten is not None else None
        inner = producer(x, "Transpose")
        if inner is None or _perm(inner, 3) != SWAP_FIRST_TWO:
            return "the projection does not take Transpose(1,0,2), flattened when it is a Gemm"
        source = _dims(inner.inputs[0])
        if source is None or len(source) != 3:
            return "the projection's input is not 3-D"
        if unflatten is not None:
            flat, restored = _dims(flatten.outputs[0]), _dims(unflatten.outputs[0])
            # [s, b, E] -> [s*b, E] -> [s*b, F] -> [s, b, F]: the sizes fix the element order.
            if flat is None or restored is None or len(flat) != 2 or len(restored) != 3 \
                    or flat[1] != source[2] or restored[2] != projection.columns \
                    or not _one_of_equal(restored[:2], [source[1], source[0]]):
                return "the Reshapes around the Gemm do not flatten [s, b] and restore it"
        nodes = [node, *([unflatten, flatten] if unflatten is not None else ()), *projection.nodes]
        kept = [inner.inputs[0], projection.weight, projection.bias]
        return Match(_with_glue(nodes, kept), [node.outputs[0]], {
            "projection": projection, "source": inner.inputs[0],
            "dims": [source[0], source[1], projection.columns],
        })

    def rewrite(self, match: Match) -> list[ir.Node]:
        projection, source = match.bindings["projection"], match.bindings["source"]
        name = match.outputs[0].name or "projection"
        if projection.gemm is not None:
            # The FusedMatMul the Gemm would have become, on the 3-D input: the weight stays as it
            # is (a Transpose of it would run at every inference once it is too large to fold).
            attrs = projection.gemm.attributes
            return [FusedProduct(source, projection.weight, projection.bias,
                                 trans_b=attrs.get_int("transB", 0), alpha=attrs.get_float("alpha", 1.0),
                                 beta=attrs.get_float("beta", 1.0)).node(f"{name}/projection")]
        nodes = [ir.Node("", "MatMul", [source, projection.weight], name=f"{name}/matmul")]
        _annotate(nodes[-1].outputs[0], match.bindings["dims"], source.dtype)
        if projection.bias is not None:
            nodes.append(ir.Node("", "Add", [nodes[-1].outputs[0], projection.bias], name=f"{name}/bias"))
        return nodes
