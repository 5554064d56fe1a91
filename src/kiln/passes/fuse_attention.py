"""Scaled dot-product attention, fused into one ``kiln::Attention`` (``kiln.ops.fused_attention``).

``softmax(Q @ K^T * scale + mask) @ V`` reaches us in the forms exporters emit:

- the scale: a Mul or Div of the scores by a number, or sqrt(scale) on Q and on K^T (torch's
  decomposition of ``F.scaled_dot_product_attention``), the number possibly computed from the
  head size through Shape glue;
- K^T: Transpose(0,1,3,2) of K, Transpose(0,2,3,1) straight from K's head split,
  Reshape/Transpose/Reshape swapping the last two axes, or Reshape [s, b*h, d] + Transpose(1,2,0)
  + Reshape [b, h, d, s] of a sequence-first K [s, b, h*d] (torch.nn.MultiheadAttention's head
  split and K's transpose, composed);
- masks, at most one of each kind: a user mask (added, or Where(mask, scores, -inf)) and a causal
  mask (a constant lower triangle cut to the sequence lengths in a Where, an upper triangle of
  -inf added, or the same computed with Trilu), which leaves its glue behind;
- torch's NaN-to-zero after the softmax, for rows a boolean mask hides entirely;
- around it, the head split Reshape [b, s, h, d] + Transpose(0,2,1,3) of each projection and the
  head merge Transpose(0,2,1,3) + Reshape [b, s, h*d] of the result, their targets constant or
  computed from Shape.

Shapes are compared symbolically: a dimension is an int or a name (the model's symbolic
dimension, or one made up for a dimension nobody named; equal names are equal sizes). Glue that
only fed the matched nodes (scale and causal-mask arithmetic, Reshape targets) goes with them.

timm's ViT splits heads differently: one projection [b, s, 3*h*d] is reshaped to [b, s, 3, h, d],
permuted (2, 0, 3, 1, 4) and unbound along its first axis into Q, K and V (a Gather of each
index, or Squeeze of a Slice, of a Split's outputs or of a SplitToSequence's items).

Rules, in order: :class:`FuseMultiHeadAttention` (split + attention + merge, ``layout="bsd"``),
:class:`FuseScaledDotProductAttention` (the attention alone, ``layout="bhsd"``),
:class:`ReplaceOnnxAttention` (ONNX's own Attention op) and :class:`FusePackedQkvAttention`
(timm's packed split and the merge around a heads-first kiln::Attention, ``layout="bsd_packed"``).
torch.nn.MultiheadAttention's sequence-first split and merge around that attention are
``fuse_mha``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.passes.rewrite import (
    KILN_DOMAIN, Match, RewritePass, RewriteRule, constant, initializer, kiln_node, producer,
)

Dim = int | str  # a static size, or the name of a symbolic one

# A fill at or below this hides a key as -inf does: exp(fill - score) underflows to 0 for any
# score a working model makes. User masks must fill -inf (or be added): a row they hide entirely
# gets the softmax of the fill, which only -inf gives the fused op too.
CAUSAL_FILL_LIMIT = -1e9
HEADS_FIRST = (0, 2, 1, 3)  # [b, s, h, d] <-> [b, h, s, d]
PACKED_PARTS_FIRST = (2, 0, 3, 1, 4)  # [b, s, 3, h, d] -> [3, b, h, s, d]
SEARCH_DEPTH = 12  # how many producers deep shapes are worked out


def fuse_attention() -> RewritePass:
    return RewritePass(
        FuseMultiHeadAttention(), FuseScaledDotProductAttention(), ReplaceOnnxAttention(),
        FusePackedQkvAttention(), name="FuseAttention",
    )


# --- symbolic shapes ----------------------------------------------------------------------------

def _unnamed(value: ir.Value, axis: int) -> str:
    """A name for a dimension nobody named: equal only to itself."""
    return f"?{id(value)}:{axis}"


def _is_unnamed(dim: Dim) -> bool:
    return isinstance(dim, str) and dim.startswith("?")


def _annotated_dims(value: ir.Value) -> list[Dim] | None:
    if value.shape is None:
        array = constant(value)
        return None if array is None else list(array.shape)
    return [d if isinstance(d, int) else d.value if d.value is not None else _unnamed(value, axis)
            for axis, d in enumerate(value.shape)]


def _dims(value: ir.Value | None, depth: int = SEARCH_DEPTH) -> list[Dim] | None:
    """The value's dimensions, None when its rank is unknown. Reshape and Transpose outputs are
    worked out from their inputs (exporters leave such glue unannotated, shape inference names
    what it cannot follow afresh); other values as annotated, or worked out where that is not
    complete."""
    if value is None:
        return None
    annotated, node = _annotated_dims(value), value.producer()
    complete = annotated is not None and not any(_is_unnamed(d) for d in annotated)
    if depth <= 0 or node is None or node.domain:
        return annotated
    if complete and node.op_type not in ("Reshape", "Transpose"):
        return annotated
    computed = _computed_dims(node, value, depth - 1)
    if computed is None or annotated is not None and len(annotated) != len(computed):
        return annotated
    if annotated is None:
        return computed
    return [a if _is_unnamed(c) else c for c, a in zip(computed, annotated)]


# Ops whose output has their inputs' broadcast shape (those of attention and its masks).
_ELEMENTWISE = {"Identity", "Cast", "CastLike", "Not", "Neg", "Add", "Sub", "Mul", "Div", "Where",
                "Equal", "Less", "Greater", "And", "Or", "Softmax", "IsNaN"}


def _computed_dims(node: ir.Node, value: ir.Value, depth: int) -> list[Dim] | None:
    if node.op_type in _ELEMENTWISE:
        return _broadcast([_dims(x, depth) for x in node.inputs], value)
    if node.op_type == "MatMul":
        a, b = _dims(node.inputs[0], depth), _dims(node.inputs[1], depth)
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        return [*(_broadcast([a[:-2], b[:-2]], value) or ()), a[-2], b[-1]]
    if node.op_type == "Transpose":
        source = _dims(node.inputs[0], depth)
        return None if source is None else [source[axis] for axis in _perm(node, len(source))]
    if node.op_type == "Reshape":
        source, target = _dims(node.inputs[0], depth), _shape_values(node.inputs[1], depth)
        if source is None or target is None:
            return None
        return _reshaped(value, source, target, node.attributes.get_int("allowzero", 0))
    return None


def _broadcast(shapes: list[list[Dim] | None], value: ir.Value) -> list[Dim] | None:
    if any(shape is None for shape in shapes):
        return None
    rank = max(len(shape) for shape in shapes)
    out: list[Dim] = []
    for axis in range(rank):
        sizes = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        out.append(1 if not sizes else sizes.pop() if len(sizes) == 1 else _unnamed(value, axis))
    return out


def _perm(node: ir.Node, rank: int) -> tuple[int, ...]:
    return tuple(node.attributes.get_ints("perm", list(reversed(range(rank)))))


def _reshaped(value: ir.Value, source: list[Dim], target: list[Dim], allowzero: int) -> list[Dim]:
    out = [source[i] if t == 0 and not allowzero and i < len(source) else t
           for i, t in enumerate(target)]
    if out.count(-1) == 1:
        inferred = out.index(-1)
        out[inferred] = _quotient(source, out[:inferred] + out[inferred + 1:])
    return [_unnamed(value, axis) if d == -1 else d for axis, d in enumerate(out)]


def _quotient(numerator: list[Dim], denominator: list[Dim]) -> Dim:
    """prod(numerator) / prod(denominator) when it is an int or one name; else -1 (unknown)."""
    names = [d for d in numerator if isinstance(d, str)]
    for d in denominator:
        if isinstance(d, str):
            if d not in names:
                return -1
            names.remove(d)
    top = math.prod(d for d in numerator if isinstance(d, int))
    bottom = math.prod(d for d in denominator if isinstance(d, int))
    if bottom == 0 or top % bottom:
        return -1
    if not names:
        return top // bottom
    return names[0] if len(names) == 1 and top == bottom else -1


def _shape_values(value: ir.Value | None, depth: int = SEARCH_DEPTH) -> list[Dim] | None:
    """The entries of a small integer tensor computed from constants and Shape (a Reshape target,
    Slice bounds): ints, or names of dimensions; None when it depends on anything else."""
    if value is None or depth <= 0:
        return None
    array = constant(value)
    if array is not None:
        whole = array.ndim <= 1 and array.dtype.kind in "iu"
        return [int(x) for x in array.reshape(-1)] if whole else None
    node, depth = value.producer(), depth - 1
    if node is None or node.domain:
        return None
    if node.op_type == "Shape":
        source = _dims(node.inputs[0], depth)
        if source is None:
            return None
        attrs = node.attributes
        return source[attrs.get_int("start", 0):attrs.get_int("end", len(source))]
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) in (0, -1):
        parts = [_shape_values(part, depth) for part in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        data, indices = _shape_values(node.inputs[0], depth), _shape_values(node.inputs[1], depth)
        if data is None or indices is None or not all(isinstance(i, int) for i in indices):
            return None
        inside = all(-len(data) <= i < len(data) for i in indices)
        return [data[i] for i in indices] if inside else None
    if node.op_type == "Slice":
        return _sliced_entries(node, depth)
    if node.op_type in ("Identity", "Cast", "CastLike", "Squeeze", "Unsqueeze", "Reshape"):
        return _shape_values(node.inputs[0], depth)
    return None


def _sliced_entries(node: ir.Node, depth: int) -> list[Dim] | None:
    data = _shape_values(node.inputs[0], depth)
    bounds = (list(node.inputs) + [None] * 4)[1:5]
    starts, ends, axes, steps = (_shape_values(v, depth) for v in bounds)
    if data is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes is not None and axes not in ([0], [-1]) or steps is not None and steps in ([0], None):
        return None
    start, end, step = starts[0], ends[0], steps[0] if steps else 1
    if not all(isinstance(x, int) for x in (start, end, step)):
        return None
    return data[start:end:step]


def _number(value: ir.Value | None) -> float | None:
    """A one-element value computed from constants and static dimensions (a scale, a fill)."""
    if value is None:
        return None
    array = constant(value)
    if array is not None:
        usable = array.size == 1 and array.ndim <= 4 and array.dtype.kind in "biuf"
        return float(array.reshape(-1)[0]) if usable else None
    node = value.producer()
    if node is None or node.domain:
        return None
    if node.op_type in ("Cast", "CastLike"):
        x = _number(node.inputs[0])
        to = node.attributes.get_int("to", 0) if node.op_type == "Cast" else _dtype(node.inputs[1])
        if x is None or not to:
            return None
        if ir.DataType(to).is_floating_point():
            return x
        return float(bool(x)) if to == ir.DataType.BOOL else float(int(x))
    if node.op_type in ("Identity", "Squeeze", "Unsqueeze", "Reshape"):
        return _number(node.inputs[0])
    if node.op_type in _ARITHMETIC:
        operands = [_number(x) for x in node.inputs]
        return None if None in operands else _ARITHMETIC[node.op_type](*operands)
    entries = _shape_values(value)
    if entries is None or len(entries) != 1 or not isinstance(entries[0], int):
        return None
    return float(entries[0])


def _dtype(value: ir.Value, depth: int = SEARCH_DEPTH) -> ir.DataType | None:
    """The value's element type, from the first input of type-keeping ops when not annotated."""
    node = value.producer()
    if value.dtype is not None or depth <= 0 or node is None or node.domain:
        return value.dtype
    keeps = node.op_type in _KEEP_TYPE and node.inputs and node.inputs[0] is not None
    return _dtype(node.inputs[0], depth - 1) if keeps else None


_KEEP_TYPE = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Slice",
              "MatMul", "Softmax", "Sqrt", "Neg", "Add", "Sub", "Mul", "Div"}

_ARITHMETIC = {
    "Sqrt": lambda x: math.sqrt(x) if x >= 0 else None,
    "Reciprocal": lambda x: 1.0 / x if x else None,
    "Neg": lambda x: -x,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b if b else None,
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
}


def _broadcasts_into(mask: list[Dim] | None, target: list[Dim]) -> bool:
    """True when ``mask`` broadcasts to ``target`` without growing it."""
    return (mask is not None and len(mask) <= len(target)
            and all(m == 1 or m == t for m, t in zip(reversed(mask), reversed(target))))


# --- causal masks --------------------------------------------------------------------------------

@dataclass
class _Triangle:
    """A causal pattern: nonzero exactly on and below the diagonal (the keys each query may see)
    when ``visible``, exactly above it otherwise; ``extent`` is its [queries, keys] size."""

    visible: bool
    extent: list[Dim]


def _corner(value: ir.Value) -> tuple[np.ndarray, list[Dim]] | None:
    """A constant, through Slices that keep its top-left corner (a registered causal buffer cut to
    the sequence lengths): its last two axes as a matrix, and the dims of the cut. Leading axes
    must repeat one matrix (a mask folded from shapes is [batch, 1, s, s] of the same triangle)."""
    slices = []
    while (node := producer(value, "Slice")) is not None:
        slices.append(node)
        value = node.inputs[0]
    array = constant(value)
    if array is None or not 2 <= array.ndim <= 4:
        return None
    matrices = array.reshape(-1, *array.shape[-2:])
    if any(not np.array_equal(matrix, matrices[0]) for matrix in matrices[1:]):
        return None
    extent: list[Dim] = list(array.shape[-2:])
    seen: set[int] = set()
    for node in slices:
        ends = _top_left_cut(node, array.ndim)
        if ends is None or ends.keys() & seen:
            return None
        seen |= ends.keys()
        for axis, end in ends.items():
            # A symbolic end is a sequence length: one longer than the buffer fails in the model.
            if isinstance(end, str) and extent[axis] < 2 or isinstance(end, int) and end < 0:
                return None
            extent[axis] = end if isinstance(end, str) else min(end, extent[axis])
    return matrices[0], [*array.shape[:-2], *extent]


def _top_left_cut(node: ir.Node, rank: int) -> dict[int, Dim] | None:
    """A Slice from 0 by steps of 1 along the last two axes: its ends by axis (0: rows, 1: cols)."""
    starts, ends, axes, steps = (_shape_values(v) for v in (list(node.inputs) + [None] * 4)[1:5])
    if starts is None or ends is None or len(starts) != len(ends) or any(s != 0 for s in starts):
        return None
    if len(node.inputs) < 4 or node.inputs[3] is None:
        axes = list(range(len(starts)))
    if axes is None or not all(isinstance(a, int) for a in axes):
        return None
    if len(node.inputs) > 4 and node.inputs[4] is not None and (steps is None or set(steps) != {1}):
        return None
    cut = {axis % rank - rank + 2: end for axis, end in zip(axes, ends)}
    return cut if len(cut) == len(axes) and all(axis >= 0 for axis in cut) else None


def _triangle(value: ir.Value) -> _Triangle | None:
    node = value.producer()
    if node is not None and not node.domain:
        if node.op_type == "Not":
            inner = _triangle(node.inputs[0])
            return inner and _Triangle(not inner.visible, inner.extent)
        if node.op_type == "Equal":
            a, b = node.inputs
            inner = _triangle(a) if _number(b) == 0 else _triangle(b) if _number(a) == 0 else None
            return inner and _Triangle(not inner.visible, inner.extent)
        # A cast to bool, or of bools, keeps which entries are nonzero.
        if node.op_type == "Cast" and ir.DataType.BOOL in (node.attributes.get_int("to", 0),
                                                           node.inputs[0].dtype):
            return _triangle(node.inputs[0])
        if node.op_type == "Trilu":
            return _trilu(node)
    corner = _corner(value)
    if corner is None:
        return None
    matrix, cut = corner
    lower = np.tri(*matrix.shape, dtype=bool)
    if np.array_equal(matrix != 0, lower):
        return _Triangle(True, cut[-2:])
    if np.array_equal(matrix != 0, ~lower):
        return _Triangle(False, cut[-2:])
    return None


def _trilu(node: ir.Node) -> _Triangle | None:
    """Trilu of a matrix of ones: the lower triangle (k=0) or the part above it (upper, k=1)."""
    ones = producer(node.inputs[0], "Expand")
    extent = ones and _shape_values(ones.inputs[1])
    if not extent or len(extent) < 2 or any(d != 1 for d in extent[:-2]):
        return None
    if _number(ones.inputs[0]) != 1:
        return None
    k = _number(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else 0
    upper = node.attributes.get_int("upper", 1)
    if (upper, k) == (0, 0):
        return _Triangle(True, extent[-2:])
    if (upper, k) == (1, 1):
        return _Triangle(False, extent[-2:])
    return None


def _causal_bias(value: ir.Value, extent: list[Dim]) -> float | None:
    """The fill when ``value`` adds 0 to the keys each query may see and a fill at or below
    CAUSAL_FILL_LIMIT to those after it, over exactly ``extent``; else None."""
    where = producer(value, "Where")
    if where is not None:
        condition, a, b = where.inputs
        shown, hidden = (a, b) if _number(a) == 0 else (b, a)
        triangle, fill = _triangle(condition), _number(hidden)
        if _number(shown) != 0 or triangle is None or fill is None or triangle.extent != extent:
            return None
        return fill if triangle.visible == (shown is a) and fill <= CAUSAL_FILL_LIMIT else None
    corner = _corner(value)
    if corner is None or corner[1][-2:] != extent or corner[0].dtype.kind != "f":
        return None
    matrix = corner[0]
    above = ~np.tri(*matrix.shape, dtype=bool)
    fills = np.unique(matrix[above])
    if np.any(matrix[~above] != 0) or len(fills) != 1 or fills[0] > CAUSAL_FILL_LIMIT:
        return None
    return float(fills[0])


# --- the attention core: softmax(Q @ K^T * scale + masks) @ V -------------------------------------

@dataclass
class _HeadSplit:
    """Reshape of a [b, s, h*d] projection into [b, s, h, d] heads, then a Transpose."""

    source: ir.Value
    reshape: ir.Node
    transpose: ir.Node
    heads: int
    head_dim: int


def _transposed_split(value: ir.Value, perm: tuple[int, ...]):
    """``value`` = Transpose(perm) of a Reshape that splits the last axis of a [b, s, n] source:
    (reshape, transpose, source dims, split dims), or None."""
    transpose = producer(value, "Transpose")
    reshape = transpose and producer(transpose.inputs[0], "Reshape")
    if reshape is None or _perm(transpose, len(perm)) != perm:
        return None
    source, split = _dims(reshape.inputs[0]), _dims(reshape.outputs[0])
    if source is None or split is None or len(source) != 3 or len(split) != len(perm):
        return None
    if split[:2] != source[:2] or not all(isinstance(d, int) and d > 0 for d in split[2:]):
        return None
    return reshape, transpose, source, split


def _head_split(value: ir.Value, perm: tuple[int, ...]) -> _HeadSplit | None:
    """``value`` = Transpose(perm) of a head split."""
    found = _transposed_split(value, perm)
    if found is None:
        return None
    reshape, transpose, _, split = found
    return _HeadSplit(reshape.inputs[0], reshape, transpose, split[2], split[3])


def _scaled(value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
    """``value`` = x * scale through Mul/Div by numbers: x, scale and those nodes."""
    scale, nodes = 1.0, []
    while (node := producer(value, ("Mul", "Div"))) is not None:
        operand, factor = _factor(node)
        if factor is None:
            break
        value, scale = operand, scale * factor
        nodes.append(node)
    return value, scale, nodes


def _factor(node: ir.Node) -> tuple[ir.Value, float | None]:
    """A Mul or Div by a number: its other operand and the factor it applies (None: not one)."""
    a, b = node.inputs
    if node.op_type == "Div":
        divisor = _number(b)
        return a, 1.0 / divisor if divisor else None
    factor = _number(b)
    return (a, factor) if factor is not None else (b, _number(a))


def _swapped_last_axes(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """``value`` = Reshape(Transpose(0,2,1)(Reshape(x, [-1, s, d])), [b, h, d, s]): x and the
    nodes."""
    outer = producer(value, "Reshape")
    transpose = outer and producer(outer.inputs[0], "Transpose")
    inner = transpose and producer(transpose.inputs[0], "Reshape")
    if inner is None or _perm(transpose, 3) != (0, 2, 1):
        return None
    source, flat, swapped = _dims(inner.inputs[0]), _dims(inner.outputs[0]), _dims(value)
    if source is None or flat is None or len(source) != 4 or len(flat) != 3:
        return None
    if flat[1:] != source[2:] or swapped != [source[0], source[1], source[3], source[2]]:
        return None
    return inner.inputs[0], [outer, transpose, inner]


@dataclass
class _SequenceFirstSplit:
    """torch.nn.MultiheadAttention's head split of a [s, b, h*d] projection: Reshape to
    [s, b*h, d], Transpose(1, 0, 2) and Reshape to [b, h, s, d]; for Kᵀ, Transpose(1, 2, 0) and
    Reshape to [b, h, d, s] (the two transposes composed)."""

    source: ir.Value
    heads: int
    head_dim: int
    nodes: list[ir.Node]


SEQUENCE_FIRST_SPLIT = (1, 0, 2)  # [s, b*h, d] -> [b*h, s, d]
SEQUENCE_FIRST_KEY_T = (1, 2, 0)  # [s, b*h, d] -> [b*h, d, s]
SEQUENCE_FIRST_HEADS = (1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]


def _sequence_first_split(value: ir.Value, perm: tuple[int, ...] = SEQUENCE_FIRST_SPLIT,
                          ) -> _SequenceFirstSplit | None:
    """``value`` = the sequence-first head split of a source (with ``perm``
    SEQUENCE_FIRST_KEY_T: Kᵀ straight from it). The shapes fix what each Reshape moves where:
    [s, b, h*d] -> [s, X, d] makes X = b*h, batch-major, and [X, s, d] -> [b, h, s, d] splits X
    back."""
    outer = producer(value, "Reshape")
    transpose = outer and producer(outer.inputs[0], "Transpose")
    inner = transpose and producer(transpose.inputs[0], "Reshape")
    if inner is None or _perm(transpose, 3) != perm:
        return None
    source, flat, out = _dims(inner.inputs[0]), _dims(inner.outputs[0]), _dims(value)
    if source is None or flat is None or out is None or (len(source), len(flat), len(out)) != (3, 3, 4):
        return None
    (seq, batch, width), heads = source, out[1]
    out_seq, out_head_dim = (out[2], out[3]) if perm == SEQUENCE_FIRST_SPLIT else (out[3], out[2])
    head_dim = flat[2]
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads <= 0 or head_dim <= 0:
        return None
    if flat[0] != seq or out[0] != batch or out_seq != seq or out_head_dim != head_dim \
            or width != heads * head_dim:
        return None
    return _SequenceFirstSplit(inner.inputs[0], heads, head_dim, [outer, transpose, inner])


@dataclass
class _Key:
    """K, found from K^T: ``value`` in [b, h, s, d] (None when K^T is made straight from the head
    split), its ``dims``, its head split if any (``sequence_first`` when K^T came straight from
    that), the scale applied to it and the nodes between it and Q @ K^T."""

    value: ir.Value | None
    dims: list[Dim]
    split: _HeadSplit | None
    scale: float
    nodes: list[ir.Node]
    sequence_first: _SequenceFirstSplit | None = None


def _key(transposed: ir.Value) -> _Key | str:
    transposed, scale, nodes = _scaled(transposed)
    swapped = _dims(transposed)
    if swapped is None or len(swapped) != 4:
        return "Kᵀ is not 4-D"
    key_dims = [*swapped[:2], swapped[3], swapped[2]]
    direct = _head_split(transposed, (0, 2, 3, 1))
    if direct is not None:
        return _Key(None, key_dims, direct, scale, [*nodes, direct.transpose])
    sequence_first = _sequence_first_split(transposed, SEQUENCE_FIRST_KEY_T)
    if sequence_first is not None:
        return _Key(None, key_dims, None, scale, [*nodes, *sequence_first.nodes],
                    sequence_first=sequence_first)
    transpose = producer(transposed, "Transpose")
    if transpose is not None and _perm(transpose, 4) == (0, 1, 3, 2):
        key, swap = transpose.inputs[0], [transpose]
    elif (found := _swapped_last_axes(transposed)) is not None:
        key, swap = found
    else:
        return "Kᵀ is not K with its last two axes swapped"
    key, key_scale, key_nodes = _scaled(key)
    split = _head_split(key, HEADS_FIRST)
    return _Key(key, key_dims, split, scale * key_scale, [*nodes, *swap, *key_nodes])


@dataclass
class _Term:
    """A mask layer between the scores and the softmax: ``Add(scores, value)`` ("add"),
    ``Where(value, scores, fill)`` ("keep") or ``Where(value, fill, scores)`` ("hide")."""

    value: ir.Value
    kind: str
    fill: float = 0.0


@dataclass
class _Scores:
    product: ir.Node  # Q @ K^T
    scale: float
    terms: list[_Term]  # innermost first
    nodes: list[ir.Node]


def _scores(value: ir.Value, masks_left: int = 2) -> _Scores | None:
    """Down from the softmax input through mask layers and the scale to Q @ K^T."""
    node = value.producer()
    layers: list[tuple[ir.Value, _Term]] = []
    if node is not None and not node.domain and masks_left:
        if node.op_type == "Add":
            a, b = node.inputs
            layers = [(a, _Term(b, "add")), (b, _Term(a, "add"))]
        elif node.op_type == "Where":
            condition, a, b = node.inputs
            for scores, other, kind in ((a, b, "keep"), (b, a, "hide")):
                fill = _number(other)
                if fill is not None and fill <= CAUSAL_FILL_LIMIT:
                    layers.append((scores, _Term(condition, kind, fill)))
    for scores, term in layers:
        found = _scores(scores, masks_left - 1)
        if found is not None:
            found.terms.append(term)
            found.nodes.append(node)
            return found
    product, scale, nodes = _scaled(value)
    matmul = producer(product, "MatMul")
    return None if matmul is None else _Scores(matmul, scale, [], [*nodes, matmul])


@dataclass
class _Core:
    """softmax(Q @ K^T * scale + masks) @ V, its operands in [b, h, s, d]."""

    query: ir.Value
    key: _Key
    value: ir.Value
    scale: float
    nodes: list[ir.Node]
    masked_rows: str
    causal: bool = False
    causal_fill: float = -math.inf
    mask: ir.Value | None = None
    mask_kind: str = "none"
    mask_hides: bool = False  # a boolean mask of the keys to hide (the fused op wants the others)


def _match_core(pv: ir.Node | None) -> _Core | str:
    if pv is None:
        return "no P @ V MatMul"
    probs, value = pv.inputs
    nan_to_zero = _nan_to_zero(probs)
    if nan_to_zero is not None:
        probs = nan_to_zero[1].inputs[0]
    softmax = producer(probs, "Softmax")
    if softmax is None or not _over_last_axis(softmax):
        return "P @ V's left operand is not a softmax over the last axis"
    scores = _scores(softmax.inputs[0])
    if scores is None:
        return "the softmax input is not Q @ Kᵀ, scaled and masked"
    query, query_scale, query_nodes = _scaled(scores.product.inputs[0])
    key = _key(scores.product.inputs[1])
    if isinstance(key, str):
        return key
    q, k, v = _dims(query), key.dims, _dims(value)
    if q is None or v is None or len(q) != 4 or len(v) != 4:
        return "Q or V is not 4-D"
    if not q[0] == k[0] == v[0] or not q[1] == k[1] == v[1]:
        return "Q, K and V do not share batch and head dimensions"
    core = _Core(query, key, value, scores.scale * query_scale * key.scale,
                 [pv, *(nan_to_zero or ()), softmax, *scores.nodes, *query_nodes, *key.nodes],
                 masked_rows="nan" if nan_to_zero is None else "zero")
    return _sort_masks(core, scores.terms, [q[0], q[1], q[2], k[2]]) or core


def _nan_to_zero(probs: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """``probs`` = Where(IsNaN(p), 0, p), torch's softmax for rows a boolean mask hides: the Where
    and the IsNaN."""
    where = producer(probs, "Where")
    is_nan = where and producer(where.inputs[0], "IsNaN")
    if is_nan is None or _number(where.inputs[1]) != 0 or where.inputs[2] is not is_nan.inputs[0]:
        return None
    return where, is_nan


def _over_last_axis(softmax: ir.Node) -> bool:
    opset = softmax.version or (softmax.graph.opset_imports.get("", 13) if softmax.graph else 13)
    return softmax.attributes.get_int("axis", -1 if opset >= 13 else 1) in (-1, 3)


def _sort_masks(core: _Core, terms: list[_Term], scores: list[Dim]) -> str | None:
    """Record the mask layers as the causal and the user mask; why not when they do not fit."""
    for position, term in enumerate(terms):
        fill = None if core.causal else _causal_fill(term, scores[2:])
        if fill is not None:
            # A finite fill replaces the user mask added before it, where -inf would absorb it.
            if position > 0 and not math.isinf(fill):
                return "a causal mask with a finite fill after another mask"
            core.causal, core.causal_fill = True, fill
        elif core.mask is not None:
            return "more than one mask"
        elif not _broadcasts_into(_mask_dims(term.value), scores):
            return "the mask does not broadcast to the scores"
        elif term.kind == "add":  # of the scores' type, as Add requires
            core.mask, core.mask_kind = term.value, "additive"
        elif not math.isinf(term.fill):
            return "a boolean mask with a finite fill"
        else:
            core.mask, core.mask_kind, core.mask_hides = term.value, "boolean", term.kind == "hide"
            negation = producer(term.value, "Not")
            if core.mask_hides and negation is not None and len(term.value.uses()) == 1:
                core.mask, core.mask_hides = negation.inputs[0], False
                core.nodes.append(negation)
    return None


def _causal_fill(term: _Term, extent: list[Dim]) -> float | None:
    if term.kind == "add":
        return _causal_bias(term.value, extent)
    triangle = _triangle(term.value)
    if triangle is None or triangle.extent != extent or triangle.visible != (term.kind == "keep"):
        return None
    return term.fill


def _mask_dims(value: ir.Value) -> list[Dim] | None:
    """A mask's dims; a constant cut from a buffer's top-left corner has the cut's."""
    corner = _corner(value)
    return corner[1] if corner is not None else _dims(value)


def _with_glue(nodes: list[ir.Node], kept: list[ir.Value | None]) -> list[ir.Node]:
    """``nodes`` and what only feeds them (shape and mask arithmetic), which dies with them;
    never the producer of a value the fused node keeps reading."""
    inside = {id(n): n for n in nodes}
    kept_ids = {id(v) for v in kept if v is not None}
    graph = nodes[0].graph
    pending = [v for n in nodes for v in n.inputs if v is not None]
    while pending:
        node = pending.pop().producer()
        if node is None or id(node) in inside or node.graph is not graph:
            continue
        if any(id(out) in kept_ids or out.is_graph_output()
               or any(id(user) not in inside for user, _ in out.uses()) for out in node.outputs):
            continue
        inside[id(node)] = node
        pending += [v for v in node.inputs if v is not None]
    return list(inside.values())


def _fused(core: _Core, q: ir.Value, k: ir.Value, v: ir.Value, name: str, layout: str,
           num_heads: Dim) -> list[ir.Node]:
    """The kiln::Attention of ``core`` on q, k, v, after the node its mask may need."""
    before, mask = [], core.mask
    if core.mask_hides:
        negation = ir.Node("", "Not", [mask], name=f"{name}/visible_keys")
        before, mask = [negation], negation.outputs[0]
    return [*before, kiln_node("Attention", [q, k, v, mask], {
        "num_heads": num_heads if isinstance(num_heads, int) else 0,
        "scale": core.scale,
        "causal": int(core.causal),
        "causal_fill": None if math.isinf(core.causal_fill) else core.causal_fill,
        "mask_kind": core.mask_kind,
        "layout": layout,
        "masked_rows": core.masked_rows,
    }, name=f"{name}/attention")]


def _head_merge(reshape: ir.Node) -> tuple[ir.Node, list[ir.Node]] | None:
    """The Transpose(0,2,1,3) a head merge ``reshape`` reads, through Identities, and those."""
    merged, identities = reshape.inputs[0], []
    while (identity := producer(merged, "Identity")) is not None:
        merged, identities = identity.inputs[0], [*identities, identity]
    transpose = producer(merged, "Transpose")
    if transpose is None or _perm(transpose, 4) != HEADS_FIRST:
        return None
    return transpose, identities


# --- timm's packed head split --------------------------------------------------------------------

@dataclass
class _PackedSplit:
    """Reshape of one projection [b, s, 3*h*d] into [b, s, 3, h, d], then
    Transpose(2, 0, 3, 1, 4) to [3, b, h, s, d]: Q, K and V along the first axis."""

    source: ir.Value
    dims: list[Dim]  # the source's
    heads: int
    head_dim: int
    nodes: list[ir.Node]


def _packed_split(value: ir.Value) -> _PackedSplit | None:
    found = _transposed_split(value, PACKED_PARTS_FIRST)
    if found is None:
        return None
    reshape, transpose, source, split = found
    parts, heads, head_dim = split[2:]
    if parts != 3 or source[2] != 3 * heads * head_dim:
        return None
    return _PackedSplit(reshape.inputs[0], source, heads, head_dim, [reshape, transpose])


@dataclass
class _Part:
    """Part ``index`` (0, 1 or 2) of ``whole`` along its first axis, taken out by ``nodes``."""

    whole: ir.Value
    index: int
    nodes: list[ir.Node]


def _part_of_three(value: ir.Value, rank: int = 5) -> _Part | None:
    """``value`` as unbind(0) of a ``rank``-D tensor of 3 along axis 0 exports it: Gather of a
    scalar index, or Squeeze(axis 0) of a one-wide Slice, of a Split into ones, of a Gather of one
    index or of an item of a SplitToSequence into ones."""
    first = (0, -rank)  # axis 0, as exporters may write it
    gather = producer(value, "Gather")
    if gather is not None:
        index = constant(gather.inputs[1])
        if gather.attributes.get_int("axis", 0) not in first or index is None \
                or index.shape != () or not -3 <= index < 3:
            return None
        return _Part(gather.inputs[0], int(index) % 3, [gather])
    squeeze = producer(value, "Squeeze")
    if squeeze is None or _squeezed_axes(squeeze) not in ([0], [-rank]):
        return None
    kept = squeeze.inputs[0]
    node = producer(kept, ("Slice", "Split", "Gather", "SequenceAt"))
    if node is None:
        return None
    if node.op_type == "SequenceAt":
        return _sequence_item(node, squeeze, first)
    if node.op_type == "Slice":
        index = _sliced_one(node, first)
    elif node.op_type == "Split":
        index = _split_one(node, kept, first)
    else:
        index = _gathered_one(node, first)
    return None if index is None else _Part(node.inputs[0], index, [node, squeeze])


def _squeezed_axes(squeeze: ir.Node) -> list[Dim] | None:
    if len(squeeze.inputs) > 1 and squeeze.inputs[1] is not None:
        return _shape_values(squeeze.inputs[1])
    axes = squeeze.attributes.get_ints("axes")  # before opset 13
    return None if axes is None else list(axes)


def _sequence_item(item: ir.Node, squeeze: ir.Node, first: tuple[int, int]) -> _Part | None:
    """``item`` = SequenceAt(SplitToSequence(x) into ones along axis 0 that keep the axis, i)."""
    split = producer(item.inputs[0], "SplitToSequence")
    position = constant(item.inputs[1])
    if split is None or position is None or position.shape != () or not -3 <= position < 3:
        return None
    # keepdims=1: the axis stays whether or not the sizes are given (the spec then ignores it).
    attrs = split.attributes
    if attrs.get_int("axis", 0) not in first or attrs.get_int("keepdims", 1) != 1:
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None \
            and _shape_values(split.inputs[1]) not in ([1], [1, 1, 1]):
        return None
    return _Part(split.inputs[0], int(position) % 3, [split, item, squeeze])


def _sliced_one(node: ir.Node, first: tuple[int, int]) -> int | None:
    """The one index of 3 a Slice along axis 0 keeps."""
    if len(node.inputs) < 3:  # bounds in attributes, before opset 10
        return None
    starts, ends, axes, steps = (
        _shape_values(bound) if bound is not None else default
        for bound, default in zip((list(node.inputs) + [None] * 2)[1:5], (None, None, [0], [1]))
    )
    if axes is None or len(axes) != 1 or axes[0] not in first or steps != [1] or starts is None \
            or ends is None:
        return None
    if len(starts) != 1 or len(ends) != 1 or not isinstance(starts[0], int) \
            or not isinstance(ends[0], int):
        return None
    picked = range(3)[starts[0]:ends[0]]  # Python's slice bounds clamp as ONNX's do for step 1
    return picked[0] if len(picked) == 1 else None


def _split_one(node: ir.Node, kept: ir.Value, first: tuple[int, int]) -> int | None:
    """Which output of a Split of 3 into ones along axis 0 ``kept`` is."""
    if node.attributes.get_int("axis", 0) not in first or len(node.outputs) != 3:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = _shape_values(node.inputs[1])
    else:  # sizes as an attribute (before opset 13), or absent: an even split
        sizes = node.attributes.get_ints("split", [1, 1, 1])
    if sizes is None or list(sizes) != [1, 1, 1]:
        return None
    return next(i for i, out in enumerate(node.outputs) if out is kept)


def _gathered_one(node: ir.Node, first: tuple[int, int]) -> int | None:
    """The index of 3 a Gather of one index along axis 0 takes."""
    index = constant(node.inputs[1])
    if node.attributes.get_int("axis", 0) not in first or index is None \
            or index.shape != (1,) or not -3 <= index[0] < 3:
        return None
    return int(index[0]) % 3


# --- rules --------------------------------------------------------------------------------------

class FuseMultiHeadAttention(RewriteRule):
    """The projections' head splits, the attention and the head merge: ``layout="bsd"``, fed the
    Q, K and V projections and giving the merged [b, s, h*d] result. Anchored at the merge."""

    anchor = "Reshape"

    def match(self, node: ir.Node) -> Match | str:
        merge = _head_merge(node)
        if merge is None:
            return "not a head merge (Transpose(0,2,1,3) then Reshape)"
        transpose, identities = merge
        core = _match_core(producer(transpose.inputs[0], "MatMul"))
        if isinstance(core, str):
            return core
        query, key = _head_split(core.query, HEADS_FIRST), core.key.split
        value = _head_split(core.value, HEADS_FIRST)
        if query is None or key is None or value is None:
            return "Q, K or V does not come from a head split"
        if not query.heads == key.heads == value.heads or query.head_dim != key.head_dim:
            return "Q, K and V split into different heads"
        heads_last, out = _dims(transpose.outputs[0]), _dims(node.outputs[0])
        if heads_last is None or out != [*heads_last[:2], value.heads * value.head_dim]:
            return "the head merge does not give [b, s, heads * head_dim]"
        splits = [n for split in (query, key, value) for n in (split.reshape, split.transpose)]
        nodes = [*core.nodes, *splits, transpose, *identities, node]
        sources = [query.source, key.source, value.source]
        return Match(_with_glue(nodes, [*sources, core.mask]), [node.outputs[0]],
                     {"core": core, "sources": sources, "heads": query.heads})

    def rewrite(self, match: Match) -> list[ir.Node]:
        return _fused(match.bindings["core"], *match.bindings["sources"],
                      match.outputs[0].name or "attention", "bsd", match.bindings["heads"])


class FuseScaledDotProductAttention(RewriteRule):
    """The attention on [b, h, s, d] operands, whatever made them: ``layout="bhsd"``. Anchored at
    the P @ V MatMul."""

    anchor = "MatMul"

    def match(self, node: ir.Node) -> Match | str:
        core = _match_core(node)
        if isinstance(core, str):
            return core
        if core.key.value is not None:
            key = core.key.value
        elif core.key.split is not None:
            key = core.key.split.reshape.outputs[0]
        else:
            key = core.key.sequence_first.source
        kept = [core.query, key, core.value, core.mask]
        return Match(_with_glue(core.nodes, kept), [node.outputs[0]], {"core": core})

    def rewrite(self, match: Match) -> list[ir.Node]:
        core, name = match.bindings["core"], match.outputs[0].name or "attention"
        heads = core.key.dims[1]
        if core.key.value is not None:
            return _fused(core, core.query, core.key.value, core.value, name, "bhsd", heads)
        if core.key.split is not None:
            # K^T came straight from K's head split; K is that split's heads-first transpose.
            key = [ir.Node("", "Transpose", [core.key.split.reshape.outputs[0]],
                           [ir.AttrInt64s("perm", list(HEADS_FIRST))], name=f"{name}/key")]
        else:
            # K^T came straight from K's sequence-first head split [s, b, h*d]: K is that source
            # split as [s, b, h, d] and transposed heads-first.
            split = core.key.sequence_first
            target = initializer(match.nodes[0].graph, f"{name}/key_heads_shape",
                                 np.array([0, 0, split.heads, split.head_dim], np.int64))
            reshape = ir.Node("", "Reshape", [split.source, target], name=f"{name}/key_heads")
            key = [reshape, ir.Node("", "Transpose", [reshape.outputs[0]],
                                    [ir.AttrInt64s("perm", list(SEQUENCE_FIRST_HEADS))],
                                    name=f"{name}/key")]
        return [*key, *_fused(core, core.query, key[-1].outputs[0], core.value, name, "bhsd", heads)]


class ReplaceOnnxAttention(RewriteRule):
    """ONNX Attention (opset 23+) without a KV cache, soft-capping, windows or grouped heads."""

    anchor = "Attention"

    def match(self, node: ir.Node) -> Match | str:
        q, k, v, mask, *cache = (list(node.inputs) + [None] * 7)[:7]
        attrs = node.attributes
        if any(x is not None for x in cache):
            return "has a KV cache or per-batch key lengths"
        if attrs.get_float("softcap", 0.0) or attrs.get_int("left_window_size", -1) != -1 \
                or attrs.get_int("right_window_size", -1) != -1:
            return "soft-capped or windowed"
        if attrs.get_int("softmax_precision", ir.DataType.FLOAT) != ir.DataType.FLOAT:
            return "softmax in a precision other than float"
        qd, kd, vd = _dims(q), _dims(k), _dims(v)
        if qd is None or kd is None or vd is None or not len(qd) == len(kd) == len(vd) in (3, 4):
            return "Q, K and V are not all 3-D or all 4-D"
        if len(qd) == 3:
            heads = attrs.get_int("q_num_heads", 0)
            if heads <= 0 or attrs.get_int("kv_num_heads", 0) != heads:
                return "grouped key/value heads"
            layout, kv_length = "bsd", kd[1]
        else:
            heads = qd[1]
            if not heads == kd[1] == vd[1]:
                return "grouped key/value heads"
            layout, kv_length = "bhsd", kd[2]
        mask_kind = "none"
        if mask is not None:
            # ONNX pads a mask shorter than the keys with -inf; take only masks that cover them.
            mask_dims = _dims(mask)
            if mask_dims is None or len(mask_dims) > 4 or mask_dims[-1] != kv_length:
                return "the mask does not cover the keys"
            if mask.dtype is None:
                return "the mask's type is unknown"
            mask_kind = "boolean" if mask.dtype == ir.DataType.BOOL else "additive"
        return Match([node], [node.outputs[0]],
                     {"layout": layout, "heads": heads, "mask_kind": mask_kind})

    def rewrite(self, match: Match) -> list[ir.Node]:
        (node,), found = match.nodes, match.bindings
        return [kiln_node("Attention", list(node.inputs[:4]), {
            "num_heads": found["heads"] if isinstance(found["heads"], int) else 0,
            "scale": node.attributes.get_float("scale", None),
            "causal": node.attributes.get_int("is_causal", 0),
            "mask_kind": found["mask_kind"],
            "layout": found["layout"],
            "masked_rows": "zero",
        }, name=node.name or "attention")]


class FusePackedQkvAttention(RewriteRule):
    """timm's attention: the packed head split of one projection X [b, s, 3*h*d] into Q, K and V,
    an attention on them already fused heads-first, and the head merge of its result;
    ``layout="bsd_packed"`` on X. Anchored at the merge."""

    anchor = "Reshape"

    def match(self, node: ir.Node) -> Match | str:
        merge = _head_merge(node)
        if merge is None:
            return "not a head merge (Transpose(0,2,1,3) then Reshape)"
        transpose, identities = merge
        attention = producer(transpose.inputs[0], "Attention", KILN_DOMAIN)
        if attention is None or attention.attributes.get_string("layout", "bsd") != "bhsd":
            return "the head merge does not take a heads-first kiln::Attention"
        q, k, v, mask = (list(attention.inputs) + [None])[:4]
        parts = [_part_of_three(x) for x in (q, k, v)]
        if None in parts:
            return "Q, K or V is not taken out of a tensor along its first axis"
        if any(p.whole is not parts[0].whole for p in parts) or [p.index for p in parts] != [0, 1, 2]:
            return "Q, K and V are not parts 0, 1 and 2 of one tensor"
        split = _packed_split(parts[0].whole)
        if split is None:
            return "Q, K and V are not split out of one [b, s, 3 * h * d] projection"
        batch, seq, _ = split.dims
        target = _shape_values(node.inputs[1])
        heads_last = [batch, seq, split.heads, split.head_dim]
        allowzero = node.attributes.get_int("allowzero", 0)
        if target is None or _reshaped(node.outputs[0], heads_last, target, allowzero) != \
                [batch, seq, split.heads * split.head_dim]:
            return "the head merge does not give [b, s, heads * head_dim]"
        taken = [n for part in parts for n in part.nodes]
        nodes = [*split.nodes, *taken, attention, transpose, *identities, node]
        return Match(_with_glue(nodes, [split.source, mask]), [node.outputs[0]],
                     {"attention": attention, "split": split, "mask": mask})

    def rewrite(self, match: Match) -> list[ir.Node]:
        attention, split, mask = (match.bindings[k] for k in ("attention", "split", "mask"))
        attributes = {name: attr.value for name, attr in attention.attributes.items()}
        inputs = [split.source] if mask is None else [split.source, None, None, mask]
        return [kiln_node("Attention", inputs,
                          {**attributes, "num_heads": split.heads, "layout": "bsd_packed"},
                          name=attention.name or "attention")]
