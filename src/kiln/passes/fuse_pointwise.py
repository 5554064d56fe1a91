"""Group connected elementwise ops into one ``kiln::Pointwise`` node: the unit a generated
pointwise kernel implements.

The pass runs last, after the other fusions: their fused layers (``kiln::FusedMatMul``,
``kiln::LayerNorm``, ...) bound the groups, except ``kiln::Activation``, which is elementwise
itself and may join one.

Nodes are visited in topological order. An elementwise node joins the group of each elementwise
producer it reads, when the merged group

- stays acyclic once contracted to one node: no path leaves it and comes back (other groups count
  as the single nodes they will become), and
- has outputs of one shape, so one iteration space covers the kernel. Its outputs are the values
  read outside the group or that are graph outputs; intermediates broadcast into that shape may be
  smaller.

Groups of one node stay as they are. In the fused node's ``body``, small constants (scalars, short
vectors) become Constant nodes, so a kernel can bake them in; every other value the group reads
from outside, large initializers included, becomes an input of the fused node.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import (
    KILN_DOMAIN,
    KILN_OPSET,
    SOURCE_OPS_KEY,
    SOURCES_KEY,
    constant,
    kiln_node,
    sources_of,
)

# ONNX ops whose every output element depends only on the input elements at the same
# (broadcast) position. None of them carries a subgraph.
ELEMENTWISE_OPS = frozenset({
    # unary math and activations
    "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Erf", "Sin",
    "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "LeakyRelu", "Elu", "Selu", "Celu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "Clip", "IsNaN", "IsInf",
    "Cast",
    # binary and ternary, with broadcasting
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})
# Constants up to this many elements are copied into the body rather than passed in.
INLINE_CONSTANT_MAX_ELEMENTS = 64


class GroupPointwise(GraphPass):
    """Replace each maximal group of two or more connected elementwise nodes, in every graph, by
    one ``kiln::Pointwise``. Counts ``groups`` and ``grouped_nodes``."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        names = _fresh_names(model)
        # Bodies of existing groups are left alone: grouping inside them would only nest groups.
        nodes = ir.traversal.RecursiveGraphIterator(model.graph, recursive=_not_a_group)
        graphs = list(dict.fromkeys([model.graph, *(node.graph for node in nodes)]))
        for graph in graphs:
            for members in find_groups(graph):
                contract(graph, members, next(names))
                changes["groups"] += 1
                changes["grouped_nodes"] += len(members)
        if changes:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_OPSET)
            # A fused node sits where its last member was; a reader of an earlier member's
            # output may come before that.
            model.graph.sort()
        return PassOutcome(model, changes)


def group_pointwise() -> GraphPass:
    return GroupPointwise()


def is_elementwise(node: ir.Node) -> bool:
    """Whether ``node`` may join a pointwise group."""
    if node.domain == KILN_DOMAIN:
        if node.op_type != "Activation":
            return False
    elif node.domain not in ("", "ai.onnx") or node.op_type not in ELEMENTWISE_OPS:
        return False
    bounds = node.inputs[1:] if node.op_type == "Clip" else ()
    if any(v is not None and _fixed_constant(v) is None for v in bounds):
        return False  # bounds computed at run time are not part of a kernel's code
    return all(v is None or v.dtype != ir.DataType.STRING for v in (*node.inputs, *node.outputs))


def find_groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """Maximal groups of two or more connected elementwise nodes of ``graph``, in graph order."""
    position = {node: index for index, node in enumerate(graph)}
    readers = _readers(graph)
    group_of: dict[ir.Node, set[ir.Node]] = {}
    for node in graph:
        if not is_elementwise(node):
            continue
        group_of[node] = {node}
        for value in node.inputs:
            producer = None if value is None else value.producer()
            if producer not in group_of or group_of[producer] is group_of[node]:
                continue
            merged = group_of[producer] | group_of[node]
            if not _one_output_shape(merged):
                continue
            if _path_returns(merged, group_of, readers, position, position[node]):
                continue
            for member in merged:
                group_of[member] = merged
    groups = {id(group): group for group in group_of.values() if len(group) > 1}.values()
    return sorted((sorted(group, key=position.__getitem__) for group in groups),
                  key=lambda members: position[members[0]])


def contract(graph: ir.Graph, members: list[ir.Node], name: str) -> ir.Node:
    """Replace ``members`` (a group, in graph order) by one kiln::Pointwise running them."""
    inside = set(members)
    outputs = [v for node in members for v in node.outputs if _read_outside(v, inside)]
    in_body: dict[ir.Value, ir.Value] = {}
    body_inputs, fused_inputs, body_nodes, inlined = [], [], [], []
    for index, value in enumerate(_read_from_outside(members, inside)):
        scoped = f"{name}/{value.name or index}"
        array = _fixed_constant(value)
        if array is not None and array.size <= INLINE_CONSTANT_MAX_ELEMENTS:
            tensor = ir.AttrTensor("value", ir.tensor(array, name=scoped))
            node = ir.Node("", "Constant", [], [tensor], name=scoped)
            body_nodes.append(node)
            in_body[value] = node.outputs[0]
            inlined.append(value)
        else:
            in_body[value] = ir.Value()
            body_inputs.append(in_body[value])
            fused_inputs.append(value)
        _name_and_type(in_body[value], scoped, value)
    for member in members:
        copy = ir.Node(member.domain, member.op_type, [in_body.get(v) for v in member.inputs],
                       member.attributes.values(), num_outputs=len(member.outputs),
                       version=member.version, name=member.name,
                       metadata_props=dict(member.metadata_props))
        for old, new in zip(member.outputs, copy.outputs):
            in_body[old] = new
            _name_and_type(new, f"{name}/{old.name}", old)
        body_nodes.append(copy)
    body = ir.Graph(body_inputs, [in_body[v] for v in outputs], nodes=body_nodes, name=name)
    fused = kiln_node("Pointwise", fused_inputs, {"body": body}, name, num_outputs=len(outputs))
    sources, source_ops = sources_of(members)
    fused.metadata_props[SOURCES_KEY] = json.dumps(sources)
    fused.metadata_props[SOURCE_OPS_KEY] = json.dumps(source_ops)
    for old, new in zip(outputs, fused.outputs):
        new.name, old.name = old.name, None  # readers and graph outputs keep the names they know
    ir.convenience.replace_nodes_and_values(
        graph, members[-1], members, [fused], outputs, list(fused.outputs)
    )
    _drop_if_unused(inlined)
    return fused


# --- finding groups ------------------------------------------------------------------------------

def _readers(graph: ir.Graph) -> dict[ir.Value, list[ir.Node]]:
    """For each value, the nodes of ``graph`` that read it, directly or inside their subgraphs."""
    readers: dict[ir.Value, list[ir.Node]] = defaultdict(list)
    for node in graph:
        read = {v for v in node.inputs if v is not None}
        for subgraph in _subgraphs_of(node):
            read.update(subgraph.outputs)
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                read.update(v for v in inner.inputs if v is not None)
        for value in read:
            readers[value].append(node)
    return readers


def _subgraphs_of(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def _path_returns(members: set[ir.Node], group_of: dict[ir.Node, set[ir.Node]],
                  readers: dict[ir.Value, list[ir.Node]], position: dict[ir.Node, int],
                  newest: int) -> bool:
    """Whether a path leaves ``members`` and comes back, each other group counting as one node.

    Every grouped node comes before the newest member (at ``newest``), so a path that passes a
    later node never reaches a group again and is not followed.
    """
    pending = [r for node in members for v in node.outputs for r in readers.get(v, ())
               if r not in members]
    seen: set[ir.Node] = set()
    while pending:
        node = pending.pop()
        if node in members:
            return True
        if node in seen or position[node] > newest:
            continue
        contracted = group_of.get(node, {node})
        seen |= contracted
        pending += [r for n in contracted for v in n.outputs for r in readers.get(v, ())]
    return False


def _one_output_shape(members: set[ir.Node]) -> bool:
    shapes = [v.shape for node in members for v in node.outputs if _read_outside(v, members)]
    return len(shapes) < 2 or all(_same_shape(shapes[0], shape) for shape in shapes[1:])


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Provably equal: same rank, each dimension the same number or the same named symbol."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x == y and (isinstance(x, int) or x.value is not None) for x, y in zip(a, b))


def _read_outside(value: ir.Value, inside: set[ir.Node]) -> bool:
    return value.is_graph_output() or any(user not in inside for user, _ in value.uses())


# --- building the fused node ---------------------------------------------------------------------

def _read_from_outside(members: list[ir.Node], inside: set[ir.Node]) -> list[ir.Value]:
    """The values ``members`` read that no member makes, in order of first use."""
    read = [v for node in members for v in node.inputs if v is not None]
    return list(dict.fromkeys(v for v in read if v.producer() not in inside))


def _fixed_constant(value: ir.Value) -> np.ndarray | None:
    """The contents of a constant the caller cannot override (unlike an initializer that is also
    a graph input), else None."""
    return None if value.is_graph_input() else constant(value)


def _name_and_type(value: ir.Value, name: str, like: ir.Value) -> None:
    value.name, value.type, value.shape = name, like.type, like.shape


def _drop_if_unused(values: Iterable[ir.Value]) -> None:
    """Remove constants that only the group read, now that the body holds copies."""
    for value in values:
        if value.uses() or value.is_graph_output():
            continue
        producer = value.producer()
        if value.is_initializer():
            value.graph.initializers.pop(value.name)
        elif producer is not None and producer.op_type == "Constant":
            producer.graph.remove(producer, safe=True)


def _not_a_group(node: ir.Node) -> bool:
    return (node.domain, node.op_type) != (KILN_DOMAIN, "Pointwise")


def _fresh_names(model: ir.Model) -> Iterator[str]:
    taken = {node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    return (name for k in itertools.count() if (name := f"pointwise_{k}") not in taken)
