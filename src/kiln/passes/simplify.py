"""Simplification: constant folding through kiln's ops, no-op removal, common subexpressions.

``simplify()`` lists the passes in order: shapes are inferred first (folding ``Shape`` and the
no-op checks read them), then :class:`Simplify` repeats folding, no-op removal, shape-arithmetic
folding and common-subexpression elimination until none of them changes anything, since each
can enable the others.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.errors import KilnError
from kiln.ops.dtypes import ELEMENT_TYPES, element_type, to_numpy, to_torch, torch_dtype
from kiln.ops.registry import lookup, normalize_domain
from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import KILN_DOMAIN, KILN_OPSET
from kiln.passes.shapes import BROADCAST_OPS, FoldShapeArithmetic, InferShapes, constant_tensor

logger = logging.getLogger("kiln.passes.simplify")

# Ops whose result is not a function of their inputs (Dropout samples in training mode).
NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
    "Multinomial", "Dropout",
})
# Inputs whose contents an op ignores (it reads their type only): they need not be constant.
TYPE_ONLY_INPUTS = frozenset({("CastLike", 1)})
# Folding may not add a constant larger than this (256 KiB of fp32): per-channel vectors and small
# tables fold, expansions or copies of weights do not.
MAX_FOLDED_ELEMENTS = 1 << 16
# A larger result is still computed, up to this size, to find whether it repeats along some axes
# (a mask built per batch from constants): then the repeated slice is stored, and an Expand.
MAX_EVALUATED_ELEMENTS = 1 << 24
MAX_CSE_CONSTANT = 16  # constants up to this size are compared by content when looking for twins
_HUGE = 2**31 - 1  # Slice bounds at least this large mean "to the end"


def simplify() -> list[GraphPass]:
    """The simplification passes, in the order they run."""
    return [InferShapes(), Simplify()]


class Simplify(GraphPass):
    """Fold constants and shape arithmetic, remove no-ops and twins, until nothing changes."""

    MAX_ROUNDS = 10

    def __call__(self, model: ir.Model) -> PassOutcome:
        steps = [FoldConstants(), RemoveNoOps(), FoldShapeArithmetic(),
                 EliminateCommonSubexpressions()]
        changes: Counter = Counter()
        for _ in range(self.MAX_ROUNDS):
            round_changes: Counter = Counter()
            for step in steps:
                round_changes += step(model).changes
            if not round_changes:
                break
            changes += round_changes
        return PassOutcome(model, changes)


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer the caller cannot override (not also a graph input)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _constant_array(value: ir.Value | None, max_size: int) -> np.ndarray | None:
    """A constant's contents when it has at most ``max_size`` elements."""
    tensor = constant_tensor(value)
    if tensor is None or tensor.size > max_size:
        return None
    return tensor.numpy()


def _static_shape(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return [int(d) for d in value.shape]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _remove_dead_code(model: ir.Model, changes: Counter) -> PassOutcome:
    if changes:
        RemoveUnusedNodesPass()(model)
    return PassOutcome(model, changes)


# --- constant folding -----------------------------------------------------------------------------

class _CannotFold(Exception):
    pass


class FoldConstants(GraphPass):
    """Evaluate nodes whose inputs are all constants with kiln's ops; results become initializers.

    Constant nodes become initializers, and ``Shape``/``Size`` of values whose (sliced) shape is
    static become constants. A node is left alone when it is random, has subgraphs, or would add a
    constant of more than ``MAX_FOLDED_ELEMENTS`` elements beyond the inputs it frees: folding
    transposes a weight read once, but never expands a scalar into a large tensor or duplicates a
    weight read elsewhere. A larger result that repeats one slice along some axes is stored as that
    slice and an Expand, which later folds read as a constant (so a chain of mask arithmetic at a
    batch size folds whole), and which broadcasting readers absorb (:class:`RemoveNoOps`). Only
    the inputs of folded nodes are read.
    """

    def __call__(self, model: ir.Model) -> PassOutcome:
        folder = _Folder(model)
        for graph in model.graphs():
            for node in list(graph):
                kind = folder.fold(graph, node)
                if kind:
                    folder.changes[kind] += 1
        return _remove_dead_code(model, folder.changes)


class _Folder:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.changes: Counter = Counter()
        self.computed: dict[ir.Value, Any] = {}  # torch results of this pass, to fold chains

    def fold(self, graph: ir.Graph, node: ir.Node) -> str | None:
        if any(out.is_graph_output() for out in node.outputs):
            return None  # a graph output keeps its producer (and its name)
        if not any(out.uses() for out in node.outputs):
            return None  # dead: removing it is dead-code removal's work, evaluating it is waste
        if node.op_type == "Constant" and node.domain == "":
            tensor = constant_tensor(node.outputs[0])
            if tensor is None:
                return None
            self._replace(graph, node, [tensor])
            return "ConstantToInitializer"
        if node.op_type in ("Shape", "Size") and node.domain == "":
            array = _static_shape_of(node)
            if array is None:
                return None
            self._replace(graph, node, [ir.tensor(array)])
            return "FoldStaticShape"
        if not all(v is None or _is_constant(v) or _is_expanded_constant(v)
                   or (node.op_type, i) in TYPE_ONLY_INPUTS for i, v in enumerate(node.inputs)):
            return None
        try:
            results = self._evaluate(node)
            stored = self._stored(node, [r for r, _ in results])
        except _CannotFold as reason:
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, reason)
            return None
        tensors = [ir.tensor(to_numpy(r, onnx_type)) for r, (_, onnx_type) in zip(stored, results)]
        self._replace(graph, node, tensors, stored, [r.shape for r, _ in results])
        return "EvaluateConstantNode"

    def _evaluate(self, node: ir.Node) -> list[tuple[torch.Tensor, int]]:
        if node.op_type in NONDETERMINISTIC and node.domain == "":
            raise _CannotFold("not deterministic")
        shapes = [_static_shape(v) for v in node.outputs]
        if not self._fits(node, shapes) and max(map(_size, shapes), default=0) > MAX_EVALUATED_ELEMENTS:
            raise _CannotFold("the result is too large to evaluate")
        domain = normalize_domain(node.domain)
        opset = self.model.opset_imports.get(domain, KILN_OPSET if domain == KILN_DOMAIN else None)
        if opset is None:
            raise _CannotFold(f"domain {domain!r} is not imported")
        try:
            impl = lookup(node.op_type, opset, domain, node.name or "")
            attributes = {name: _decode(attr) for name, attr in node.attributes.items()}
            inputs = [self._torch(node, i) for i in range(len(node.inputs))]
            while inputs and inputs[-1] is None:
                inputs.pop()
            input_types = [_type_number(v) for v in node.inputs]
            output_types = [_type_number(v) for v in node.outputs]
            bound = impl.bind(attributes, torch.device("cpu"), len(node.outputs), input_types,
                              output_types)
            result = impl(inputs, bound)
        except (KilnError, RuntimeError, ValueError, IndexError, TypeError, KeyError,
                NotImplementedError) as error:
            # A node that fails here fails at run time too; the runtime reports it with context.
            raise _CannotFold(str(error)) from None
        results = list(result) if isinstance(result, tuple) else [result]
        if len(results) != len(node.outputs) or not all(isinstance(r, torch.Tensor) for r in results):
            raise _CannotFold("results are not tensors")
        return [(r, self._output_type(node, value, r)) for r, value in zip(results, node.outputs)]

    def _stored(self, node: ir.Node, results: list[torch.Tensor]) -> list[torch.Tensor]:
        """What to keep of the results: themselves, or the slices they repeat when that is small."""
        if self._fits(node, [list(r.shape) for r in results]):
            return results
        if node.op_type == "Expand" and node.domain == "":
            raise _CannotFold("an expansion stays one")
        compact = [_repeated_slice(r) for r in results]
        if not self._fits(node, [list(r.shape) for r in compact]):
            raise _CannotFold("the result is larger than the constants it replaces")
        return compact

    def _fits(self, node: ir.Node, output_shapes: list[list[int] | None]) -> bool:
        """Whether storing results of these shapes adds little beyond the constants they free."""
        if None in output_shapes:
            return True  # unknown until evaluated; checked again on the results
        sizes = [_size(shape) for shape in output_shapes]
        if max(sizes, default=0) <= MAX_FOLDED_ELEMENTS:
            return True
        freed = sum(
            v.const_value.size for v in set(node.inputs)
            if _is_constant(v) and all(user is node for user, _ in v.uses())
            and not v.is_graph_output()
        )
        return sum(sizes) <= freed

    def _torch(self, node: ir.Node, index: int) -> Any:
        value = node.inputs[index]
        if value is None:
            return None
        if value.dtype == ir.DataType.STRING:
            raise _CannotFold("string input")
        if (node.op_type, index) in TYPE_ONLY_INPUTS and not _is_constant(value):
            if value.dtype is None:
                raise _CannotFold("input type unknown")
            return torch.empty(0, dtype=torch_dtype(value.dtype.value))
        if value not in self.computed:
            if _is_constant(value):
                self.computed[value] = _read_only_torch(value.const_value.numpy())
            else:  # an expanded constant: a view, so the expansion costs no memory
                expand = value.producer()
                base, shape = (self._torch(expand, i) for i in range(2))
                self.computed[value] = base.expand(torch.broadcast_shapes(base.shape, tuple(shape.tolist())))
        return self.computed[value]

    @staticmethod
    def _output_type(node: ir.Node, value: ir.Value, result: torch.Tensor) -> int:
        """The ONNX type of an output, checked against the result's storage type."""
        if value.dtype is None:
            # Without a declared type, a widened result type (e.g. uint32 kept as int64) is ambiguous.
            if any(v is not None and _is_widened(v.dtype) for v in node.inputs):
                raise _CannotFold("output type unknown")
            try:
                return element_type(result.dtype).onnx_type
            except KeyError:
                raise _CannotFold(f"no ONNX type for {result.dtype}") from None
        declared = ELEMENT_TYPES.get(value.dtype.value)
        if declared is None or declared.torch != result.dtype:
            raise _CannotFold(f"result is {result.dtype}, the graph says {value.dtype}")
        return value.dtype.value

    def _replace(self, graph: ir.Graph, node: ir.Node, tensors: list[ir.TensorProtocol],
                 results: list[torch.Tensor] | None = None,
                 shapes: list[torch.Size] | None = None) -> None:
        """Swap the node for initializers named after its outputs; a stored slice smaller than its
        output's shape (``shapes``) is expanded back to it by an Expand node."""
        for i, (value, tensor) in enumerate(zip(node.outputs, tensors)):
            if not value.uses():
                continue
            name = value.name or f"{node.name or node.op_type}_{i}"
            value.name = None  # the initializer (or the Expand) takes the name
            if shapes is None or tuple(tensor.shape) == tuple(shapes[i]):
                folded = _register_initializer(graph, name, tensor)
                if results is not None:
                    self.computed[folded] = results[i]
            else:
                folded = self._expanded(graph, node, name, tensor, shapes[i])
                self.computed[folded] = results[i].expand(shapes[i])
            ir.convenience.replace_all_uses_with(value, folded)
        inputs = set(node.inputs)
        graph.remove(node, safe=True)
        for value in inputs:
            _drop_if_unused(value)

    def _expanded(self, graph: ir.Graph, before: ir.Node, name: str, tensor: ir.TensorProtocol,
                  shape: torch.Size) -> ir.Value:
        base = _register_initializer(graph, f"{name}_repeated", tensor)
        target = _register_initializer(graph, f"{name}_shape", ir.tensor(np.array(shape, np.int64)))
        expand = ir.Node("", "Expand", [base, target], name=f"{name}_expand", num_outputs=1)
        output = expand.outputs[0]
        output.name, output.dtype, output.shape = name, tensor.dtype, ir.Shape(list(shape))
        graph.insert_before(before, expand)
        return output


def _size(shape: list[int] | None) -> int:
    return 0 if shape is None else math.prod(shape)


def _is_expanded_constant(value: ir.Value) -> bool:
    """The output of an Expand of a constant to a constant shape (as folding writes them)."""
    producer = value.producer()
    return (producer is not None and producer.op_type == "Expand" and producer.domain == ""
            and all(_is_constant(v) for v in producer.inputs))


def _repeated_slice(result: torch.Tensor) -> torch.Tensor:
    """The smallest tensor that broadcasts to ``result``: each axis along which it repeats one
    slice (bit for bit, so NaNs and signed zeros count) is cut to that slice."""
    bits = _bits(result)
    if bits is None:
        return result
    for axis in range(result.dim()):
        if result.shape[axis] > 1:
            first = bits.narrow(axis, 0, 1)
            if torch.equal(bits, first.expand_as(bits)):
                bits, result = first, result.narrow(axis, 0, 1)
    return result.contiguous()


_SAME_WIDTH_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's bytes as integers of its width, to compare exactly; None for complex."""
    if tensor.is_complex():
        return None
    if tensor.dtype == torch.bool:
        return tensor
    return tensor.contiguous().view(_SAME_WIDTH_INTEGER[tensor.element_size()])


def _drop_if_unused(value: ir.Value | None) -> None:
    """Remove an initializer nothing reads any more (in subgraphs too, unlike dead-code removal)."""
    if (value is not None and value.is_initializer() and not value.uses()
            and not value.is_graph_input() and not value.is_graph_output()):
        value.graph.initializers.pop(value.name)


def _register_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}_{n}", n + 1
    tensor.name = unique
    value = ir.Value(name=unique, const_value=tensor, type=ir.TensorType(tensor.dtype),
                     shape=ir.Shape(tensor.shape))
    graph.register_initializer(value)
    return value


_SHARED_WITH_TORCH = frozenset(np.dtype(t) for t in (
    np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_,
    np.complex64, np.complex128,
))


def _read_only_torch(array: np.ndarray) -> Any:
    """A constant as torch reads it, sharing memory where it can: a weight is not copied."""
    if array.dtype not in _SHARED_WITH_TORCH or not array.flags.c_contiguous:
        return to_torch(array)
    with warnings.catch_warnings():
        # torch warns that a read-only buffer must not be written; ops never write their inputs.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _type_number(value: ir.Value | None) -> int:
    return 0 if value is None or value.dtype is None else value.dtype.value


def _is_widened(dtype: ir.DataType | None) -> bool:
    etype = None if dtype is None else ELEMENT_TYPES.get(dtype.value)
    return etype is not None and etype.widened


def _static_shape_of(node: ir.Node) -> np.ndarray | None:
    """Shape (with start/end) or Size of a value, when the part asked for is static."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = list(shape)
    if node.op_type == "Shape":
        dims = dims[_attr(node, "start", 0):_attr(node, "end", None)]
    if not all(isinstance(d, int) for d in dims):
        return None
    if node.op_type == "Size":
        return np.array(math.prod(dims), np.int64)
    return np.array(dims, np.int64)


def _decode(attr: ir.Attr) -> Any:
    """An attribute as kiln's ops take it (see ``kiln.ops.registry``)."""
    kind, value = attr.type, attr.value
    A = ir.AttributeType
    if kind == A.INT:
        return int(value)
    if kind == A.FLOAT:
        return float(value)
    if kind == A.STRING:
        return value.decode() if isinstance(value, bytes) else value
    if kind == A.INTS:
        return [int(v) for v in value]
    if kind == A.FLOATS:
        return [float(v) for v in value]
    if kind == A.STRINGS:
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    if kind == A.TENSOR:
        return to_torch(value.numpy())
    if kind == A.TENSORS:
        return [to_torch(t.numpy()) for t in value]
    raise _CannotFold(f"attribute {attr.name!r} of type {kind.name}")


# --- no-op removal --------------------------------------------------------------------------------

class RemoveNoOps(GraphPass):
    """Remove nodes that return their input unchanged, and compose Transpose pairs.

    Each rule looks at one node and returns the value that can stand for its output, or None.
    """

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        for graph in model.graphs():
            for node in list(graph):
                if node.graph is not graph or node.domain != "":
                    continue
                if node.op_type == "Transpose" and _compose_transposes(node):
                    changes["ComposeTransposes"] += 1
                if node.op_type == "Expand" and (absorbed := _absorb_expand(node)):
                    changes["AbsorbExpandIntoBroadcast"] += absorbed
                rule = NO_OP_RULES.get(node.op_type)
                if rule is None:
                    continue
                name, check = rule
                replacement = check(node)
                if replacement is not None and _forward(graph, node, replacement):
                    changes[name] += 1
        return _remove_dead_code(model, changes)


def _forward(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> bool:
    """Let readers of the node's first output read ``replacement``, and drop the node."""
    output = node.outputs[0]
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return False
    if output.is_graph_output():
        # The graph output keeps its name: the replacement takes it, when it is free to.
        producer = replacement.producer()
        if (replacement.is_graph_input() or replacement.is_graph_output()
                or producer is None or producer.graph is not graph):
            return False
        name, output.name = output.name, None
        replacement.name = name
    if replacement.type is None:
        replacement.type = output.type
    if replacement.shape is None:
        replacement.shape = output.shape
    ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return True


def _identity(node: ir.Node) -> ir.Value | None:
    return node.inputs[0] if node.inputs else None


def _inference_dropout(node: ir.Node) -> ir.Value | None:
    training = _input(node, 2)
    if training is not None:
        flag = _constant_array(training, 1)
        if flag is None or bool(flag.reshape(-1)[0]):
            return None
    return node.inputs[0]


def _cast_to_same_type(node: ir.Node) -> ir.Value | None:
    source = node.inputs[0]
    if source.dtype is None:
        return None
    if node.op_type == "CastLike":
        like = node.inputs[1].dtype
        return source if like == source.dtype else None
    return source if _attr(node, "to") == source.dtype.value else None


def _reshape_to_same_shape(node: ir.Node) -> ir.Value | None:
    data = node.inputs[0]
    target = _constant_array(_input(node, 1), 64)
    if data.shape is None or target is None or target.ndim != 1 or len(target) != len(data.shape):
        return None
    allowzero = _attr(node, "allowzero", 0)
    inferred = 0
    for t, dim in zip(target.tolist(), data.shape):
        if t == -1:
            inferred += 1
        elif not (t == 0 and not allowzero or t == dim):
            return None
    return data if inferred <= 1 else None  # -1 takes the one remaining dim: the same


def _expand_to_same_shape(node: ir.Node) -> ir.Value | None:
    data = node.inputs[0]
    target = _constant_array(node.inputs[1], 64)
    if data.shape is None or target is None or target.ndim != 1 or len(target) > len(data.shape):
        return None
    dims = list(data.shape)[len(data.shape) - len(target):]
    return data if all(t == 1 or t == d for t, d in zip(target.tolist(), dims)) else None


def _absorb_expand(node: ir.Node) -> int:
    """Let each broadcasting reader whose output keeps its shape without the Expand read the
    Expand's input instead (it broadcasts there anyway); returns how many readers did."""
    absorbed = 0
    for reader, index in list(node.outputs[0].uses()):
        if reader.domain != "" or reader.op_type not in BROADCAST_OPS:
            continue
        output = _static_shape(reader.outputs[0])
        shapes = [_static_shape(node.inputs[0] if i == index else v) for i, v in enumerate(reader.inputs)]
        if output is None or None in shapes:
            continue
        try:
            unchanged = list(torch.broadcast_shapes(*map(tuple, shapes))) == output
        except RuntimeError:
            continue
        if unchanged:
            reader.replace_input_with(index, node.inputs[0])
            absorbed += 1
    return absorbed


def _perm(node: ir.Node) -> list[int] | None:
    perm = _attr(node, "perm")
    if perm is not None:
        return list(perm)
    shape = node.inputs[0].shape
    return None if shape is None else list(reversed(range(len(shape))))


def _identity_transpose(node: ir.Node) -> ir.Value | None:
    perm = _perm(node)
    return node.inputs[0] if perm is not None and perm == sorted(perm) else None


def _compose_transposes(node: ir.Node) -> bool:
    """Transpose(Transpose(x, p1), p2) reads x directly, with the composed perm."""
    inner = node.inputs[0].producer()
    if inner is None or inner.op_type != "Transpose" or inner.domain != "":
        return False
    first, second = _perm(inner), _perm(node)
    if first is None or second is None or len(first) != len(second):
        return False
    node.replace_input_with(0, inner.inputs[0])
    node.attributes["perm"] = ir.AttrInt64s("perm", [first[p] for p in second])
    return True


def _zero_pad(node: ir.Node) -> ir.Value | None:
    pads = _attr(node, "pads", _attr(node, "paddings"))
    if pads is None:
        found = _constant_array(_input(node, 1), 64)
        pads = None if found is None else found.tolist()
    return node.inputs[0] if pads is not None and not any(pads) else None


def _full_slice(node: ir.Node) -> ir.Value | None:
    data = node.inputs[0]
    if data.shape is None:
        return None
    if "starts" in node.attributes:  # Slice-1
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes"), None
    else:
        found = [_constant_array(_input(node, i), 64) for i in range(1, 5)]
        if any(f is None for f, v in zip(found, node.inputs[1:]) if v is not None):
            return None
        starts, ends, axes, steps = (None if f is None else f.tolist() for f in found)
    rank = len(data.shape)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if not -rank <= axis < rank or step != 1:
            return None
        dim = data.shape[axis]
        static = isinstance(dim, int)
        starts_at_first = start == 0 or static and start <= -dim
        ends_at_last = end >= _HUGE or static and end >= dim
        if not (starts_at_first and ends_at_last):
            return None
    return data


def _axes(node: ir.Node) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None:
        found = _constant_array(_input(node, 1), 64)
        axes = None if found is None else found.tolist()
    return None if axes is None else list(axes)


def _normalized(axes: list[int], rank: int | None) -> set[int] | None:
    if any(a < 0 for a in axes) and rank is None:
        return None
    return {a + rank if a < 0 else a for a in axes}


def _squeeze_unsqueeze_pair(node: ir.Node) -> ir.Value | None:
    """Squeeze(Unsqueeze(x, a), a) and Unsqueeze(Squeeze(x, a), a) are x."""
    other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    inner = node.inputs[0].producer()
    if inner is None or inner.op_type != other or inner.domain != "":
        return None
    source = inner.inputs[0]
    inner_axes, outer_axes = _axes(inner), _axes(node)
    if not inner_axes or not outer_axes:
        return None  # Squeeze without axes removes every dim of size 1, whichever they are
    rank = None if source.shape is None else len(source.shape)
    if node.op_type == "Squeeze" and rank is not None:
        rank += len(inner_axes)  # both axes count in the unsqueezed rank
    same = _normalized(inner_axes, rank)
    return source if same is not None and same == _normalized(outer_axes, rank) else None


def _single_input_concat(node: ir.Node) -> ir.Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


_NEUTRAL = {"Add": (0, (0, 1)), "Sub": (0, (1,)), "Mul": (1, (0, 1)), "Div": (1, (1,))}


def _neutral_operand(node: ir.Node) -> ir.Value | None:
    """x + 0, x - 0, x * 1, x / 1, when the constant does not broadcast x to a larger shape."""
    neutral, positions = _NEUTRAL[node.op_type]
    output = node.outputs[0]
    for position in positions:
        constant = _constant_array(node.inputs[position], MAX_FOLDED_ELEMENTS)
        other = node.inputs[1 - position]
        if constant is None or other.shape is None or other.dtype != output.dtype:
            continue
        if constant.ndim > len(other.shape) or not np.all(constant == neutral):
            continue
        aligned = list(other.shape)[len(other.shape) - constant.ndim:]
        if all(c == 1 or c == d for c, d in zip(constant.shape, aligned)):
            return other
    return None


NO_OP_RULES: dict[str, tuple[str, Callable[[ir.Node], ir.Value | None]]] = {
    "Identity": ("RemoveIdentity", _identity),
    "Dropout": ("RemoveInferenceDropout", _inference_dropout),
    "Cast": ("RemoveCastToSameType", _cast_to_same_type),
    "CastLike": ("RemoveCastToSameType", _cast_to_same_type),
    "Reshape": ("RemoveReshapeToSameShape", _reshape_to_same_shape),
    "Expand": ("RemoveExpandToSameShape", _expand_to_same_shape),
    "Transpose": ("RemoveIdentityTranspose", _identity_transpose),
    "Pad": ("RemoveZeroPad", _zero_pad),
    "Slice": ("RemoveFullSlice", _full_slice),
    "Squeeze": ("RemoveSqueezeUnsqueezePair", _squeeze_unsqueeze_pair),
    "Unsqueeze": ("RemoveSqueezeUnsqueezePair", _squeeze_unsqueeze_pair),
    "Concat": ("RemoveSingleInputConcat", _single_input_concat),
    **{op: ("RemoveNeutralArithmetic", _neutral_operand) for op in _NEUTRAL},
}


# --- common subexpressions ------------------------------------------------------------------------

class EliminateCommonSubexpressions(GraphPass):
    """Nodes that compute the same op on the same inputs with the same attributes become one.

    Like onnx_ir's CommonSubexpressionEliminationPass, but also in subgraphs (each graph on its
    own), with small constants compared by content, and never merging random ops (Bernoulli too).
    Nodes with subgraphs are left alone.
    """

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        for graph in model.graphs():
            seen: dict[tuple, ir.Node] = {}
            for node in list(graph):
                key = _node_key(node)
                if key is None:
                    continue
                twin = seen.setdefault(key, node)
                if twin is node or any(out.is_graph_output() for out in node.outputs):
                    continue
                ir.convenience.replace_all_uses_with(list(node.outputs), list(twin.outputs))
                graph.remove(node, safe=True)
                changes["MergeCommonSubexpression"] += 1
        return PassOutcome(model, changes)


def _node_key(node: ir.Node) -> tuple | None:
    if node.op_type in NONDETERMINISTIC and node.domain == "":
        return None
    attributes = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            attributes.append((name, tuple(attr.value)))
        elif attr.type in (ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING):
            attributes.append((name, attr.value))
        elif attr.type == ir.AttributeType.TENSOR and attr.value.size <= MAX_CSE_CONSTANT:
            attributes.append((name, _content_key(attr.value)))
        else:
            return None
    inputs = tuple(_input_key(v) for v in node.inputs)
    return (node.domain, node.op_type, node.overload, len(node.outputs), inputs, tuple(attributes))


def _input_key(value: ir.Value | None) -> Any:
    if value is None:
        return None
    if _is_constant(value) and value.const_value.size <= MAX_CSE_CONSTANT:
        return _content_key(value.const_value)
    return id(value)


def _content_key(tensor: ir.TensorProtocol) -> tuple:
    array = tensor.numpy()
    return (tensor.dtype, array.shape, array.tobytes() if array.dtype != object else str(array.tolist()))
