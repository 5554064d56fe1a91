"""Symbolic shape inference, and folding of the shape arithmetic it makes known.

ONNX's own inference (with data propagation) runs first. Then kiln walks each graph in order and
computes every output's shape as sympy expressions over the model's named dimensions, so
``Reshape([batch, seq, 768] -> [-1, 768])`` gives ``[batch*seq, 768]`` where ONNX gives a fresh
``unk__N``. Small integer tensors (shapes, sizes, indices) are propagated by value too: that is how
a Reshape target computed by ``Shape -> Gather -> Concat`` becomes known.

Dimension names are sympy's canonical printing of the expression (``batch*seq``,
``floor(height/2 - 1/2) + 1``), so equal dimensions have equal names; names are parsed back when a
later pass reads them. Named dimensions are taken to be positive integers below 2**31, as kiln's
profiles require. A dimension kiln cannot express is left as ONNX inferred it, and so is every
output of an op without a rule here.

``KILN_SHAPE_RULES`` holds the rules of kiln's fused ops: an op missing from it gets the shape of
its first input.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import onnx_ir as ir
import sympy
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from sympy.printing.str import StrPrinter

from kiln.ops.custom import ShapeFunction, custom_shape
from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import KILN_DOMAIN, initializer

logger = logging.getLogger("kiln.passes.shapes")

Expr = sympy.Expr
Dims = list[Expr]  # one expression per dimension
MAX_VALUE_ELEMENTS = 64  # integer tensors up to this size are propagated by value
_HUGE = 2**31 - 1  # Slice bounds at least this large mean "to the end"


# --- dimension expressions ------------------------------------------------------------------------

@cache
def symbol(name: str) -> sympy.Symbol:
    """The symbol of a named dimension (every name maps to the same symbol)."""
    return sympy.Symbol(name, integer=True, positive=True)


def unknown() -> sympy.Dummy:
    """A dimension nothing is known about; it only equals itself."""
    return sympy.Dummy("unknown", integer=True, positive=True)


def is_known(expr: Expr) -> bool:
    return not any(isinstance(s, sympy.Dummy) for s in expr.free_symbols)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|`([^`]*)`|(\*\*|[-+*/(),]))")
_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max, "Min": sympy.Min,
              "Mod": sympy.Mod}


class _DimPrinter(StrPrinter):
    """sympy's printing, with names that are not identifiers quoted so they parse back whole."""

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return expr.name if _IDENTIFIER.match(expr.name) else f"`{expr.name}`"


def dim_name(expr: Expr) -> str:
    if isinstance(expr, sympy.Symbol):
        return expr.name
    return _DimPrinter().doprint(expr)


@lru_cache(maxsize=4096)
def parse_dim(text: str) -> Expr:
    """The expression a dimension name spells; a name that is no expression is one symbol."""
    tokens, position = [], 0
    while position < len(text.rstrip()):
        found = _TOKEN.match(text, position)
        if found is None:
            return symbol(text)
        tokens.append(found.groups())
        position = found.end()
    try:
        expr, rest = _parse_sum(tokens)
    except (IndexError, ValueError, TypeError):
        return symbol(text)
    return symbol(text) if rest else expr


def _parse_sum(tokens):
    expr, tokens = _parse_product(tokens)
    while tokens and tokens[0][3] in ("+", "-"):
        op, (rhs, tokens) = tokens[0][3], _parse_product(tokens[1:])
        expr = expr + rhs if op == "+" else expr - rhs
    return expr, tokens


def _parse_product(tokens):
    expr, tokens = _parse_power(tokens)
    while tokens and tokens[0][3] in ("*", "/"):
        op, (rhs, tokens) = tokens[0][3], _parse_power(tokens[1:])
        expr = expr * rhs if op == "*" else expr / rhs
    return expr, tokens


def _parse_power(tokens):
    if tokens[0][3] == "-":
        expr, tokens = _parse_power(tokens[1:])
        return -expr, tokens
    expr, tokens = _parse_atom(tokens)
    if tokens and tokens[0][3] == "**":
        exponent, tokens = _parse_power(tokens[1:])
        expr = expr**exponent
    return expr, tokens


def _parse_atom(tokens):
    number, name, quoted, op = tokens[0]
    rest = tokens[1:]
    if number is not None:
        return sympy.Integer(int(number)), rest
    if quoted is not None:
        return symbol(quoted), rest
    if name is not None and rest and rest[0][3] == "(":
        if name not in _FUNCTIONS:
            raise ValueError(name)
        args, rest = [], rest[1:]
        while True:
            arg, rest = _parse_sum(rest)
            args.append(arg)
            if rest[0][3] == ")":
                return _FUNCTIONS[name](*args), rest[1:]
            if rest[0][3] != ",":
                raise ValueError(rest[0])
            rest = rest[1:]
    if name is not None:
        return symbol(name), rest
    if op == "(":
        expr, rest = _parse_sum(rest)
        if rest[0][3] != ")":
            raise ValueError(rest[0])
        return expr, rest[1:]
    raise ValueError(op)


def to_expr(dim: int | ir.SymbolicDim) -> Expr:
    if isinstance(dim, int):
        return sympy.Integer(dim)
    return unknown() if dim.value is None else parse_dim(dim.value)


def to_dim(expr: Expr) -> int | ir.SymbolicDim:
    if expr.is_Integer:
        return int(expr)
    return ir.SymbolicDim(dim_name(expr) if is_known(expr) else None)


# --- the analysis ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Elements:
    """The contents of a small integer tensor of rank 0 or 1, one expression per element."""

    values: tuple[Expr, ...]
    scalar: bool

    def ints(self) -> list[int] | None:
        return [int(v) for v in self.values] if all(v.is_Integer for v in self.values) else None


ShapeRule = Callable[["ShapeAnalysis", ir.Node], Sequence["Dims | None"]]
ValueRule = Callable[["ShapeAnalysis", ir.Node], "Elements | None"]


class ShapeAnalysis:
    """Symbolic shapes and small integer contents of the values of a model, written back to it.

    ``refine`` walks the graphs in order, computes each node's output shapes by the rules, and
    sets ``value.shape`` where it learns more than the graph said; ``changed`` counts the values
    it refined.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.dims: dict[ir.Value, Dims] = {}
        self.elements: dict[ir.Value, Elements] = {}
        self.changed = 0
        # A name the graph gave an unknown dim (ONNX's unk__N) stands for the same value wherever
        # it appears: once one is computed, every dim of that name is known.
        self.learned: dict[sympy.Symbol, Expr] = {}
        self._input_symbols = {
            symbol(d.value) for v in model.graph.inputs if v.shape is not None
            for d in v.shape if isinstance(d, ir.SymbolicDim) and d.value is not None
        }

    def refine(self) -> None:
        self._refine_graph(self.model.graph)
        if self.learned:
            for graph in self.model.graphs():
                for node in graph:
                    for value in node.outputs:
                        self._rename_learned(value)

    def _read(self, dim: int | ir.SymbolicDim) -> Expr:
        expr = to_expr(dim)
        return expr.xreplace(self.learned) if self.learned else expr

    def _rename_learned(self, value: ir.Value) -> None:
        if value.shape is None:
            return
        renamed = ir.Shape([to_dim(self._read(d)) for d in value.shape])
        if list(renamed) != list(value.shape):
            value.shape = renamed
            self.changed += 1

    def _refine_graph(self, graph: ir.Graph) -> None:
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    self._refine_graph(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for subgraph in attr.value:
                        self._refine_graph(subgraph)
            self._refine_node(node)

    def _refine_node(self, node: ir.Node) -> None:
        rule = _shape_rule(node)
        computed: Sequence[Dims | None] = ()
        if rule is not None:
            try:
                computed = rule(self, node)
            except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError) as error:
                # A malformed node: leave its outputs as they are; building it reports the error.
                logger.debug("no symbolic shape for %s (%s): %s", node.name, node.op_type, error)
        for value, dims in zip(node.outputs, computed):
            if dims is not None:
                self._merge(value, dims)
        if node.domain == KILN_DOMAIN and node.outputs and node.outputs[0].dtype is None:
            first = next((v for v in node.inputs if v is not None), None)
            node.outputs[0].dtype = first.dtype if first is not None else None
        value_rule = VALUE_RULES.get(node.op_type) if node.domain == "" else None
        if value_rule is not None and len(node.outputs) == 1:
            try:
                found = value_rule(self, node)
            except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError):
                found = None
            if found is not None and len(found.values) <= MAX_VALUE_ELEMENTS:
                self.elements[node.outputs[0]] = found
                if node.outputs[0].dtype is None:  # the type of what it was computed from
                    from_shape = node.op_type in ("Shape", "Size")
                    node.outputs[0].dtype = ir.DataType.INT64 if from_shape else node.inputs[0].dtype

    def _merge(self, value: ir.Value, computed: Dims) -> None:
        """Keep what the graph says where it is as specific; take the computed dims elsewhere."""
        existing = value.shape
        if existing is not None and len(existing) != len(computed):
            logger.debug("%s: computed rank %d, graph says %s", value.name, len(computed), existing)
            return
        merged = []
        for i, expr in enumerate(computed):
            if expr.is_number and not (expr.is_Integer and expr >= 0):
                expr = unknown()  # an invalid node (say, a fractional size): runtime reports it
            old = None if existing is None else self._read(existing[i])
            if old is not None and (old.is_Integer or not is_known(expr)):
                merged.append(old)
                continue
            if (isinstance(old, sympy.Symbol) and old not in self._input_symbols and old != expr
                    and old not in expr.free_symbols):
                self.learned[old] = expr
            merged.append(expr)
        new_shape = ir.Shape([to_dim(e) for e in merged])
        if existing is None or list(existing) != list(new_shape):
            value.shape = new_shape
            self.changed += 1
        self.dims[value] = merged

    # --- what rules ask ----------------------------------------------------------------------------

    def shape(self, value: ir.Value | None) -> Dims | None:
        if value is None:
            return None
        if value not in self.dims:
            if value.shape is None:
                return None
            self.dims[value] = [self._read(d) for d in value.shape]
        return self.dims[value]

    def rank(self, value: ir.Value | None) -> int | None:
        dims = self.shape(value)
        return None if dims is None else len(dims)

    def contents(self, value: ir.Value | None) -> Elements | None:
        """The elements of a small integer tensor of rank <= 1, when known."""
        if value is None:
            return None
        if value not in self.elements:
            array = _small_constant(value)
            if array is None or array.ndim > 1 or array.dtype.kind not in "iu":
                return None
            self.elements[value] = Elements(
                tuple(sympy.Integer(int(v)) for v in array.reshape(-1)), array.ndim == 0
            )
        return self.elements[value]

    def ints(self, value: ir.Value | None) -> list[int] | None:
        found = self.contents(value)
        return None if found is None else found.ints()


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer (one the caller cannot override) or of a Constant's output."""
    if value is None or value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a sparse Constant
        return None


def _small_constant(value: ir.Value) -> np.ndarray | None:
    """A constant's contents when it is small, without reading large weights."""
    tensor = constant_tensor(value)
    if tensor is None or tensor.size > MAX_VALUE_ELEMENTS:
        return None
    return tensor.numpy()


def _shape_rule(node: ir.Node) -> ShapeRule | None:
    if node.domain == "":
        return SHAPE_RULES.get(node.op_type)
    if node.domain == KILN_DOMAIN:
        return KILN_SHAPE_RULES.get(node.op_type, _same_as_first)
    function = custom_shape(node.domain, node.op_type)
    return None if function is None else _custom_rule(function)


def _custom_rule(function: ShapeFunction) -> ShapeRule:
    """A custom op's shape function (dims as ints or names) as a symbolic rule."""

    def rule(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
        shapes = []
        for value in node.inputs:
            dims = a.shape(value)
            shapes.append(None if dims is None else tuple(
                int(d) if d.is_Integer else dim_name(d) for d in dims
            ))
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        result = function(*shapes, **attributes)
        outputs = result if isinstance(result, list) else [result]
        return [
            None if shape is None else [sympy.Integer(d) if isinstance(d, int) else parse_dim(d) for d in shape]
            for shape in outputs
        ]

    return rule


# --- helpers --------------------------------------------------------------------------------------

def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _axes(a: ShapeAnalysis, node: ir.Node, input_index: int) -> tuple[bool, list[int] | None]:
    """(given, axes) from the ``axes`` attribute or input; axes is None when not known."""
    if "axes" in node.attributes:
        return True, list(_attr(node, "axes"))
    value = _input(node, input_index)
    if value is None:
        return False, None
    return True, a.ints(value)


def _product(dims: Sequence[Expr]) -> Expr:
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def broadcast(*shapes: Dims) -> Dims:
    """Multidirectional broadcasting; a pair of different symbols broadcasts to an unknown."""
    rank = max(len(s) for s in shapes)
    result = []
    for i in range(rank):
        dims = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        dims.discard(sympy.Integer(1))
        if not dims:
            result.append(sympy.Integer(1))
        elif len(dims) == 1:
            result.append(dims.pop())
        else:
            fixed = [d for d in dims if d.is_Integer]
            result.append(fixed[0] if len(fixed) == 1 else unknown())
    return result


def _floor_div(a: Expr, b: Expr) -> Expr:
    """ONNX integer division (truncating); exact for the non-negative values dims are."""
    if a.is_Integer and b.is_Integer:
        q = abs(int(a)) // abs(int(b))
        return sympy.Integer(q if (int(a) >= 0) == (int(b) > 0) else -q)
    if a.is_nonnegative and b.is_positive:
        return sympy.floor(a / b)
    return unknown()


# --- shape rules: ONNX ops ------------------------------------------------------------------------

def _same_as_first(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    return [a.shape(node.inputs[0])]


def _same_for_all_outputs(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    return [a.shape(node.inputs[0])] * len(node.outputs)


def _broadcast_inputs(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    shapes = [a.shape(v) for v in node.inputs if v is not None]
    return [broadcast(*shapes) if shapes and None not in shapes else None]


def _matmul(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    left, right = a.shape(node.inputs[0]), a.shape(node.inputs[1])
    if left is None or right is None:
        return [None]
    left_batch, m = (left[:-2], [left[-2]]) if len(left) >= 2 else ([], [])
    right_batch, n = (right[:-2], [right[-1]]) if len(right) >= 2 else ([], [])
    return [broadcast(left_batch, right_batch) + m + n]


def _gemm(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    left, right = a.shape(node.inputs[0]), a.shape(node.inputs[1])
    if left is None or right is None:
        return [None]
    m = left[1] if _attr(node, "transA", 0) else left[0]
    n = right[0] if _attr(node, "transB", 0) else right[1]
    return [[m, n]]


def _transpose(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    perm = _attr(node, "perm") or list(reversed(range(len(dims))))
    return [[dims[p] for p in perm]]


def reshape_dims(dims: Dims, target: Sequence[Expr], allowzero: int) -> Dims:
    """The output of Reshape(dims, target): 0 copies (unless allowzero), -1 takes the rest."""
    result = [
        dims[i] if t == 0 and not allowzero else t for i, t in enumerate(target)
    ]
    inferred = [i for i, t in enumerate(result) if t == -1]
    if len(inferred) == 1:
        others = _product([t for i, t in enumerate(result) if i != inferred[0]])
        result[inferred[0]] = unknown() if others == 0 else _product(dims) / others
    return result


def _reshape(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims, target = a.shape(node.inputs[0]), a.contents(_input(node, 1))
    if dims is None or target is None:
        return [None]
    return [reshape_dims(dims, target.values, _attr(node, "allowzero", 0))]


def _flatten(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    axis = _attr(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    return [[_product(dims[:axis]), _product(dims[axis:])]]


def _squeeze(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    given, axes = _axes(a, node, 1)
    if dims is None or given and axes is None:
        return [None]
    if not given:
        if not all(d.is_Integer for d in dims):
            return [None]
        return [[d for d in dims if d != 1]]
    dropped = {_axis(x, len(dims)) for x in axes}
    return [[d for i, d in enumerate(dims) if i not in dropped]]


def _unsqueeze(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    _, axes = _axes(a, node, 1)
    if dims is None or axes is None:
        return [None]
    rank = len(dims) + len(axes)
    inserted = {_axis(x, rank) for x in axes}
    rest = iter(dims)
    return [[sympy.Integer(1) if i in inserted else next(rest) for i in range(rank)]]


def _concat(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    shapes = [a.shape(v) for v in node.inputs if v is not None]
    if not shapes or None in shapes:
        return [None]
    axis = _axis(_attr(node, "axis"), len(shapes[0]))
    result = []
    for i in range(len(shapes[0])):
        if i == axis:
            result.append(sympy.Add(*(s[i] for s in shapes)))
        else:
            fixed = [s[i] for s in shapes if s[i].is_Integer]
            result.append(fixed[0] if fixed else shapes[0][i])
    return [result]


def _split(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None] * len(node.outputs)
    axis = _axis(_attr(node, "axis", 0), len(dims))
    sizes = _attr(node, "split")
    split_input = _input(node, 1)
    if sizes is None and split_input is not None:
        found = a.contents(split_input)
        if found is None:
            return [None] * len(node.outputs)
        sizes = list(found.values)
    if sizes is None:
        n = len(node.outputs)
        chunk = sympy.ceiling(dims[axis] / n)
        sizes = [chunk] * (n - 1) + [dims[axis] - chunk * (n - 1)]
    return [dims[:axis] + [sympy.Integer(s) if isinstance(s, int) else s] + dims[axis + 1:]
            for s in sizes]


def _clamped(bound: Expr, dim: Expr, low: int, high_offset: int) -> Expr:
    """A Slice bound clamped to [low, dim + high_offset] after counting negatives from the end."""
    if bound.is_Integer:
        if bound >= _HUGE:
            return dim + high_offset
        if bound <= -_HUGE:
            return sympy.Integer(low)
        if bound < 0:
            return sympy.Max(bound + dim, low)
    elif not bound.is_nonnegative:
        return unknown()  # it might count from the end
    return sympy.Min(bound, dim + high_offset)


def slice_length(dim: Expr, start: Expr, end: Expr, step: int) -> Expr:
    if step > 0:
        first, stop = _clamped(start, dim, 0, 0), _clamped(end, dim, 0, 0)
        return sympy.Max(sympy.ceiling((stop - first) / step), 0)
    first, stop = _clamped(start, dim, 0, -1), _clamped(end, dim, -1, -1)
    return sympy.Max(sympy.ceiling((first - stop) / -step), 0)


def _slice(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    if "starts" in node.attributes:  # Slice-1
        starts = [sympy.Integer(v) for v in _attr(node, "starts")]
        ends = [sympy.Integer(v) for v in _attr(node, "ends")]
        axes, steps = _attr(node, "axes"), None
    else:
        found_starts, found_ends = a.contents(node.inputs[1]), a.contents(node.inputs[2])
        axes_value, steps_value = _input(node, 3), _input(node, 4)
        axes = None if axes_value is None else a.ints(axes_value)
        steps = None if steps_value is None else a.ints(steps_value)
        if (found_starts is None or found_ends is None or axes_value is not None and axes is None
                or steps_value is not None and steps is None):
            return [None]
        starts, ends = found_starts.values, found_ends.values
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    result = list(dims)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis = _axis(axis, len(dims))
        result[axis] = slice_length(dims[axis], start, end, step)
    return [result]


def _gather(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    data, indices = a.shape(node.inputs[0]), a.shape(node.inputs[1])
    if data is None or indices is None:
        return [None]
    axis = _axis(_attr(node, "axis", 0), len(data))
    return [data[:axis] + indices + data[axis + 1:]]


def _second_input_shape(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    return [a.shape(node.inputs[1])]


def _split_to_sequence(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    """The shape every element of the sequence has, when they all have one."""
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    axis = _axis(_attr(node, "axis", 0), len(dims))
    split = _input(node, 1)
    if split is None:
        keep = _attr(node, "keepdims", 1)
        return [dims[:axis] + [sympy.Integer(1)] * keep + dims[axis + 1:]]
    size = a.contents(split)
    if size is None or not size.scalar:
        return [None]
    chunk = size.values[0]
    whole = dims[axis].is_Integer and chunk.is_Integer and dims[axis] % chunk == 0
    return [dims[:axis] + [chunk if whole else unknown()] + dims[axis + 1:]]


def _expand(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims, target = a.shape(node.inputs[0]), a.contents(node.inputs[1])
    if dims is None or target is None:
        return [None]
    return [broadcast(dims, list(target.values))]


def _tile(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims, repeats = a.shape(node.inputs[0]), a.contents(node.inputs[1])
    if dims is None or repeats is None:
        return [None]
    return [[d * r for d, r in zip(dims, repeats.values)]]


def _constant_of_shape(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    target = a.contents(node.inputs[0])
    return [None if target is None else list(target.values)]


def _range(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    start, limit, delta = (a.contents(v) for v in node.inputs)
    if start is None or limit is None or delta is None or not delta.values[0].is_Integer:
        return [None]
    step = delta.values[0]
    return [[sympy.Max(sympy.ceiling((limit.values[0] - start.values[0]) / step), 0)]]


def _shape_slice(node: ir.Node) -> slice:
    """Shape's start/end: Python's slicing clamps exactly as ONNX does."""
    return slice(_attr(node, "start", 0), _attr(node, "end", None))


def _shape(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    rank = a.rank(node.inputs[0])
    if rank is None:
        return [None]
    return [[sympy.Integer(len(range(rank)[_shape_slice(node)]))]]


def _size(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    return [[]]


def _reduce(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    if node.op_type in ("ArgMax", "ArgMin"):
        given, axes = True, [_attr(node, "axis", 0)]
    else:
        given, axes = _axes(a, node, 1)
    if given and axes is None:
        return [None]
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return [dims]
        axes = list(range(len(dims)))
    reduced = {_axis(x, len(dims)) for x in axes}
    keep = _attr(node, "keepdims", 1)
    return [[sympy.Integer(1) if i in reduced else d
             for i, d in enumerate(dims) if keep or i not in reduced]]


def window_output(dim: Expr, kernel: Expr, stride: int, dilation: int, pads: tuple[Expr, Expr],
                  auto_pad: str) -> Expr:
    """The length of a Conv or Pool output dimension (floor mode)."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return sympy.ceiling(dim / stride)
    if auto_pad == "VALID":
        pads = (sympy.Integer(0), sympy.Integer(0))
    return sympy.floor((dim + pads[0] + pads[1] - dilation * (kernel - 1) - 1) / stride) + 1


def _windowed(a: ShapeAnalysis, node: ir.Node, channels: Expr | None, kernel: Sequence[Expr]
              ) -> Dims | None:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return None
    spatial = len(dims) - 2
    strides = _attr(node, "strides") or [1] * spatial
    dilations = _attr(node, "dilations") or [1] * spatial
    pads = [sympy.Integer(p) for p in _attr(node, "pads") or [0] * (2 * spatial)]
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out = [window_output(dims[2 + i], kernel[i], strides[i], dilations[i],
                         (pads[i], pads[spatial + i]), auto_pad) for i in range(spatial)]
    return [dims[0], dims[1] if channels is None else channels, *out]


def _conv(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    weight = a.shape(node.inputs[1])
    if weight is None:
        return [None]
    kernel = [sympy.Integer(k) for k in _attr(node, "kernel_shape", [])] or weight[2:]
    return [_windowed(a, node, weight[0], kernel)]


def _pool(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    if _attr(node, "ceil_mode", 0):
        return [None]  # the last window's placement rules differ; ONNX's inference covers it
    dims = _windowed(a, node, None, [sympy.Integer(k) for k in _attr(node, "kernel_shape")])
    return [dims] * len(node.outputs)


def _global_pool(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    return [None if dims is None else dims[:2] + [sympy.Integer(1)] * (len(dims) - 2)]


def _pad(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    if "pads" in node.attributes:
        pads, axes = [sympy.Integer(p) for p in _attr(node, "pads")], None
    else:
        found = a.contents(node.inputs[1])
        given, axes = _axes(a, node, 3)
        if found is None or given and axes is None:
            return [None]
        pads = list(found.values)
    axes = [_axis(x, len(dims)) for x in axes] if axes else list(range(len(dims)))
    result = list(dims)
    for i, axis in enumerate(axes):
        result[axis] = dims[axis] + pads[i] + pads[len(axes) + i]
    return [result]


def _topk(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims, k = a.shape(node.inputs[0]), a.contents(node.inputs[1])
    if dims is None or k is None:
        return [None, None]
    axis = _axis(_attr(node, "axis", -1), len(dims))
    out = dims[:axis] + [k.values[0]] + dims[axis + 1:]
    return [out, out]


def _depth_to_space(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    n, c, h, w = dims
    b = _attr(node, "blocksize")
    return [[n, c / (b * b), h * b, w * b]]


def _space_to_depth(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return [None]
    n, c, h, w = dims
    b = _attr(node, "blocksize")
    return [[n, c * b * b, h / b, w / b]]


_SAME_SHAPE = """
    Abs Acos Acosh Asin Asinh Atan Atanh BatchNormalization Cast CastLike Ceil Celu Clip Cos Cosh
    CumSum DequantizeLinear DynamicQuantizeLinear Elu Erf Exp Floor Gelu GroupNormalization
    HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN LRN LayerNormalization
    LeakyRelu Log LogSoftmax LpNormalization MeanVarianceNormalization Mish Neg Not
    QuantizeLinear Reciprocal Relu ReverseSequence Round RMSNormalization ScatterElements
    ScatterND Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign Sqrt Swish Tan Tanh
    ThresholdedRelu Trilu
""".split()
BROADCAST_OPS = """
    Add And BitShift BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less
    LessOrEqual Max Mean Min Mod Mul Or PRelu Pow Sub Sum Where Xor
""".split()
_REDUCTIONS = """
    ArgMax ArgMin ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare
""".split()

SHAPE_RULES: dict[str, ShapeRule] = {
    **dict.fromkeys(_SAME_SHAPE, _same_as_first),
    **dict.fromkeys(BROADCAST_OPS, _broadcast_inputs),
    **dict.fromkeys(_REDUCTIONS, _reduce),
    **dict.fromkeys(["AveragePool", "LpPool", "MaxPool"], _pool),
    **dict.fromkeys(["GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool"], _global_pool),
    "Dropout": _same_for_all_outputs,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv,
    "Transpose": _transpose, "Reshape": _reshape, "Flatten": _flatten,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Gather": _gather, "GatherElements": _second_input_shape,
    "Expand": _expand, "Tile": _tile, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Shape": _shape, "Size": _size, "Pad": _pad, "TopK": _topk,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    # A sequence value's shape is its elements' shape, as onnx_ir keeps it.
    "SplitToSequence": _split_to_sequence, "SequenceAt": _same_as_first,
}

# Shapes of kiln's fused ops; an op not listed has its first input's shape. FusedMatMul is MatMul
# with an epilogue (A's batch dims + N), FusedConv is Conv with one, Attention gives Q's shape.
def _attention(a: ShapeAnalysis, node: ir.Node) -> list[Dims | None]:
    """Q's shape; a packed [b, s, 3*h*d] projection gives [b, s, h*d]."""
    dims = a.shape(node.inputs[0])
    if dims is None or _attr(node, "layout", "bsd") != "bsd_packed":
        return [dims]
    return [[*dims[:-1], dims[-1] / 3]]


KILN_SHAPE_RULES: dict[str, ShapeRule] = {
    "FusedMatMul": _matmul,
    "FusedConv": _conv,
    "QuantizedMatMul": _matmul,
    "QuantizedConv": _conv,
    "Attention": _attention,
}


# --- value rules: small integer tensors -----------------------------------------------------------

def _shape_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    dims = a.shape(node.inputs[0])
    if dims is None:
        return None
    return Elements(tuple(dims[_shape_slice(node)]), False)


def _size_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    dims = a.shape(node.inputs[0])
    return None if dims is None else Elements((_product(dims),), True)


def _gather_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    data, indices = a.contents(node.inputs[0]), a.contents(node.inputs[1])
    if data is None or data.scalar or indices is None or _attr(node, "axis", 0) != 0:
        return None
    picked = indices.ints()
    if picked is None:
        return None
    return Elements(tuple(data.values[_axis(i, len(data.values))] for i in picked), indices.scalar)


def _concat_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    parts = [a.contents(v) for v in node.inputs]
    if any(p is None or p.scalar for p in parts):
        return None
    return Elements(tuple(v for p in parts for v in p.values), False)


def _as_vector(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    """Unsqueeze, Reshape or Flatten of a small value: same elements, rank 1."""
    found = a.contents(node.inputs[0])
    out_rank = a.rank(node.outputs[0])
    if found is None or out_rank != 1:
        return None
    return Elements(found.values, False)


def _as_scalar(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    found = a.contents(node.inputs[0])
    if found is None or len(found.values) != 1 or a.rank(node.outputs[0]) != 0:
        return None
    return Elements(found.values, True)


def _reshaped_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    return _as_vector(a, node) or _as_scalar(a, node)


def _copied_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    return a.contents(node.inputs[0])


def _cast_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    """A cast to an integer type; exporters write Range(0, n, 1) bounds as cast floats."""
    if node.outputs[0].dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    found = a.contents(node.inputs[0])
    if found is not None:
        return found
    array = _small_constant(node.inputs[0])
    if array is None or array.ndim > 1 or array.dtype.kind != "f" or np.any(array % 1):
        return None
    return Elements(tuple(sympy.Integer(int(v)) for v in array.reshape(-1)), array.ndim == 0)


def _slice_value(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
    data = a.contents(node.inputs[0])
    if data is None or data.scalar or "starts" in node.attributes:
        return None
    starts, ends = a.ints(node.inputs[1]), a.ints(node.inputs[2])
    steps = a.ints(_input(node, 4)) if _input(node, 4) is not None else [1]
    if starts is None or ends is None or steps is None or len(starts) != 1:
        return None
    return Elements(data.values[starts[0]:ends[0]:steps[0]], False)


def _arithmetic(combine: Callable[[Expr, Expr], Expr]) -> ValueRule:
    def rule(a: ShapeAnalysis, node: ir.Node) -> Elements | None:
        left, right = a.contents(node.inputs[0]), a.contents(node.inputs[1])
        if left is None or right is None:
            return None
        n = max(len(left.values), len(right.values))
        if {len(left.values), len(right.values)} - {1, n}:
            return None
        pick = (lambda e, i: e.values[0] if len(e.values) == 1 else e.values[i])
        return Elements(tuple(combine(pick(left, i), pick(right, i)) for i in range(n)),
                        left.scalar and right.scalar)
    return rule


VALUE_RULES: dict[str, ValueRule] = {
    "Shape": _shape_value, "Size": _size_value, "Gather": _gather_value,
    "Concat": _concat_value, "Unsqueeze": _as_vector, "Squeeze": _as_scalar,
    "Reshape": _reshaped_value, "Flatten": _as_vector, "Identity": _copied_value,
    "Cast": _cast_value, "CastLike": _cast_value, "Slice": _slice_value,
    "Add": _arithmetic(lambda x, y: x + y), "Sub": _arithmetic(lambda x, y: x - y),
    "Mul": _arithmetic(lambda x, y: x * y), "Div": _arithmetic(_floor_div),
    "Max": _arithmetic(sympy.Max), "Min": _arithmetic(sympy.Min),
}


# --- passes ---------------------------------------------------------------------------------------

class InferShapes(GraphPass):
    """ONNX's shape inference, then kiln's symbolic refinement of every shape it can express."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        if ShapeInferencePass(strict_mode=False, data_prop=True)(model).modified:
            changes["InferredByOnnx"] += 1
        analysis = ShapeAnalysis(model)
        analysis.refine()
        changes["RefinedSymbolically"] += analysis.changed
        return PassOutcome(model, +changes)


class FoldShapeArithmetic(GraphPass):
    """Replace shape computations whose results are known by constants.

    Small integer tensors whose every element is a number become initializers (``Shape`` of a
    value whose dims are static, even when other dims are not). A Reshape target computed from
    symbolic dims becomes a constant with 0 (copy the input's dim) and -1 (the rest) where that is
    exactly the same; an Expand target, a constant with 1 where it repeats the input's dim. The
    glue that computed them is removed when nothing else reads it.
    """

    def __call__(self, model: ir.Model) -> PassOutcome:
        analysis = ShapeAnalysis(model)
        analysis.refine()
        changes: Counter = Counter()
        for graph in model.graphs():
            for node in list(graph):
                if node.domain != "":
                    continue
                if node.op_type == "Reshape" and _fold_reshape_target(analysis, graph, node):
                    changes["ReshapeTargetToConstant"] += 1
                elif node.op_type == "Expand" and _fold_expand_target(analysis, graph, node):
                    changes["ExpandTargetToConstant"] += 1
                elif _fold_known_value(analysis, graph, node):
                    changes["ShapeValueToConstant"] += 1
        if changes:
            RemoveUnusedNodesPass()(model)
        return PassOutcome(model, changes)


def _constant_input(graph: ir.Graph, node: ir.Node, index: int, values: list[int]) -> None:
    name = f"{node.name or node.op_type}_{'shape' if index == 1 else index}"
    node.replace_input_with(index, initializer(graph, name, np.array(values, np.int64)))


def _fold_known_value(a: ShapeAnalysis, graph: ir.Graph, node: ir.Node) -> bool:
    if node.op_type == "Constant" or len(node.outputs) != 1:
        return False
    value = node.outputs[0]
    found = a.elements.get(value)
    numbers = None if found is None else found.ints()
    if numbers is None or value.is_graph_output() or not value.uses() or value.dtype is None:
        return False
    array = np.array(numbers[0] if found.scalar else numbers, value.dtype.numpy())
    name, value.name = value.name or "shape", None  # the constant takes the name
    ir.convenience.replace_all_uses_with(value, initializer(graph, name, array))
    return True


def _fold_reshape_target(a: ShapeAnalysis, graph: ir.Graph, node: ir.Node) -> bool:
    dims, target_value = a.shape(node.inputs[0]), _input(node, 1)
    target = a.contents(target_value)
    if dims is None or target is None or constant_tensor(target_value) is not None:
        return False
    if not all(is_known(t) for t in target.values):
        return False
    allowzero = _attr(node, "allowzero", 0)
    copies = not allowzero or 0 not in target.values  # 0 means "copy" once allowzero is off
    values, rest = [], []
    for i, t in enumerate(target.values):
        if t.is_Integer:
            values.append(int(t))
        elif copies and i < len(dims) and t == dims[i]:
            values.append(0)
        elif t.is_positive:  # -1 infers a positive dim only
            values.append(-1)
            rest.append(i)
        else:
            return False
    if len(rest) > 1 or rest and -1 in [int(t) for t in target.values if t.is_Integer]:
        return False
    _constant_input(graph, node, 1, values)
    if allowzero and 0 in values:
        node.attributes.pop("allowzero")
    return True


def _fold_expand_target(a: ShapeAnalysis, graph: ir.Graph, node: ir.Node) -> bool:
    dims, target_value = a.shape(node.inputs[0]), node.inputs[1]
    target = a.contents(target_value)
    if dims is None or target is None or constant_tensor(target_value) is not None:
        return False
    offset = len(target.values) - len(dims)
    values = []
    for i, t in enumerate(target.values):
        if t.is_Integer:
            values.append(int(t))
        elif i >= offset and t == dims[i - offset]:
            values.append(1)  # broadcasting a dim with 1 keeps it
        else:
            return False
    _constant_input(graph, node, 1, values)
    return True
