"""Rewrite rules: find a subgraph from an anchor node, check it, replace it by new nodes.

A rule is a small class: ``anchor`` names the op type where matching starts (usually the last
node of the pattern); ``match`` walks producers from there and returns a :class:`Match` or a
string saying why it did not match; ``rewrite`` builds the replacement nodes. The fused node
records every ONNX node it came from in its metadata, so ``inspect`` can show them.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.ops.activation import ACTIVATIONS
from kiln.passes.base import GraphPass, PassOutcome

KILN_DOMAIN = "kiln"
KILN_OPSET = 1
SOURCES_KEY = "kiln.sources"
SOURCE_OPS_KEY = "kiln.source_ops"


@dataclass
class Match:
    """The nodes a rule matched (any order) and the values it needs to rewrite them."""

    nodes: list[ir.Node]
    outputs: list[ir.Value]  # the values of the matched subgraph that the rest of the graph reads
    bindings: dict[str, Any] = field(default_factory=dict)


class RewriteRule(ABC):
    anchor: str
    anchor_domain: str = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def match(self, node: ir.Node) -> Match | str: ...

    @abstractmethod
    def rewrite(self, match: Match) -> list[ir.Node]:
        """New nodes in order; the last node's outputs replace ``match.outputs``, in order."""


class RewritePass(GraphPass):
    """Apply rules to every graph (subgraphs too) until none matches; count matches per rule."""

    def __init__(self, *rules: RewriteRule, name: str | None = None) -> None:
        self.rules = rules
        self._name = name

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        graphs = [model.graph, *_subgraphs(model.graph)]
        for graph in graphs:
            for rule in self.rules:
                changes[rule.name] += _apply(rule, graph)
        if changes and any(changes.values()):
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_OPSET)
        return PassOutcome(model, +changes)


def _subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    found = []
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found += [attr.value, *_subgraphs(attr.value)]
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    found += [sub, *_subgraphs(sub)]
    return found


def _apply(rule: RewriteRule, graph: ir.Graph) -> int:
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.graph is not graph or node.op_type != rule.anchor or node.domain != rule.anchor_domain:
                continue
            found = rule.match(node)
            if isinstance(found, str) or not is_self_contained(found):
                continue
            replace(graph, found, rule.rewrite(found))
            count += 1
            changed = True
    return count


def is_self_contained(match: Match) -> bool:
    """True when only ``match.outputs`` are read outside the matched nodes."""
    inside = {id(n) for n in match.nodes}
    exposed = {id(v) for v in match.outputs}
    for node in match.nodes:
        for value in node.outputs:
            if id(value) in exposed:
                continue
            if value.is_graph_output() or any(id(user) not in inside for user, _ in value.uses()):
                return False
    return True


def replace(graph: ir.Graph, match: Match, new_nodes: list[ir.Node]) -> None:
    """Swap ``match.nodes`` for ``new_nodes``; the new outputs take over the old ones' names."""
    new_outputs = new_nodes[-1].outputs[: len(match.outputs)]
    sources, source_ops = sources_of(match.nodes)
    for node in new_nodes:
        node.metadata_props[SOURCES_KEY] = json.dumps(sources)
        node.metadata_props[SOURCE_OPS_KEY] = json.dumps(source_ops)
    for old, new in zip(match.outputs, new_outputs):
        new.name, old.name = old.name, None
        new.type, new.shape = old.type, old.shape
    inside = {id(n) for n in match.nodes}
    ordered = [node for node in graph if id(node) in inside]  # one scan: Graph.index is linear too
    ir.convenience.replace_nodes_and_values(
        graph, ordered[-1], ordered, new_nodes, list(match.outputs), list(new_outputs)
    )


def sources_of(nodes: Iterable[ir.Node]) -> tuple[list[str], list[str]]:
    """The ONNX nodes behind ``nodes``, in graph order, looking through earlier fusions."""
    sources, source_ops = [], []
    for node in nodes:
        if SOURCES_KEY in node.metadata_props:
            sources += json.loads(node.metadata_props[SOURCES_KEY])
            source_ops += json.loads(node.metadata_props[SOURCE_OPS_KEY])
        else:
            sources.append(node.name or "")
            source_ops.append(node.op_type)
    return sources, source_ops


# --- helpers rules share ------------------------------------------------------------------------

def producer(value: ir.Value | None, op_type: str | Sequence[str], domain: str = "") -> ir.Node | None:
    """The node making ``value`` when it is one of ``op_type`` (in ``domain``), else None."""
    if value is None:
        return None
    node = value.producer()
    types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
    if node is None or node.op_type not in types or node.domain != domain:
        return None
    return node


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is an initializer or a Constant's output, else None.

    An initializer that is also a graph input is not constant: callers may override it.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    """A constant holding one number (any shape of size 1), as a float; else None."""
    array = constant(value)
    if array is None or array.size != 1 or array.dtype.kind not in "biuf":
        return None
    return float(array.reshape(-1)[0])


def kiln_node(op_type: str, inputs: Sequence[ir.Value | None], attributes: dict[str, Any],
              name: str, num_outputs: int = 1) -> ir.Node:
    """A node of kiln's fused-op domain."""
    attrs = [ir.convenience.convert_attribute(k, v) for k, v in attributes.items() if v is not None]
    return ir.Node(KILN_DOMAIN, op_type, inputs, attrs, num_outputs=num_outputs, name=name)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer with a name unique in ``graph``."""
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}_{n}", n + 1
    value = ir.Value(name=unique, const_value=ir.tensor(array, name=unique))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype is not None and value.dtype.is_floating_point()


def same_shape(x: ir.Value, y: ir.Value) -> bool:
    """True when both shapes are known and equal dimension by dimension (named dims by name)."""
    if x.shape is None or y.shape is None or x.shape.rank() != y.shape.rank():
        return False
    return all(
        p == q and not (isinstance(p, ir.SymbolicDim) and p.value is None)
        for p, q in zip(x.shape, y.shape)
    )


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """Clip's (min, max) when both are constant (a missing one is infinite), else None."""
    if "min" in node.attributes or "max" in node.attributes:  # Clip before opset 11
        return node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)
    bounds = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        bound = node.inputs[index] if len(node.inputs) > index else None
        if bound is None:
            bounds.append(default)
        elif (number := scalar(bound)) is not None:
            bounds.append(number)
        else:
            return None
    return bounds[0], bounds[1]


# ONNX activations epilogue fusions absorb, and kiln::Activation from the activation rules.
ACTIVATION_OPS = [
    ("", op) for op in ("Relu", "LeakyRelu", "Elu", "Clip", "Sigmoid", "HardSigmoid", "Tanh",
                        "Gelu", "HardSwish", "Softplus", "Mish")
] + [(KILN_DOMAIN, "Activation")]
_PLAIN_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "HardSwish", "Softplus", "Mish"}
_GELU_BY_APPROXIMATION = {"none": "Gelu", "tanh": "GeluTanh"}


def activation_of(node: ir.Node) -> tuple[str, list[float]] | str:
    """The node as a name of :data:`ACTIVATIONS` and its parameters, or why it is not one."""
    attrs = node.attributes
    if node.domain == KILN_DOMAIN and node.op_type == "Activation":
        name = attrs.get_string("activation", "")
        if name not in ACTIVATIONS:
            return f"{node.name}: unknown activation {name!r}"
        return name, list(attrs.get_floats("activation_params", []))
    if node.domain != "":
        return f"{node.name}: {node.domain}::{node.op_type} is not an activation"
    if node.op_type in _PLAIN_ACTIVATIONS:
        return node.op_type, []
    if node.op_type == "LeakyRelu":
        return "LeakyRelu", [attrs.get_float("alpha", 0.01)]
    if node.op_type == "Elu":
        return "Elu", [attrs.get_float("alpha", 1.0)]
    if node.op_type == "HardSigmoid":
        return "HardSigmoid", [attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)]
    if node.op_type == "Gelu":
        approximation = attrs.get_string("approximate", "none")
        if approximation not in _GELU_BY_APPROXIMATION:
            return f"{node.name}: Gelu approximation {approximation!r} is unknown"
        return _GELU_BY_APPROXIMATION[approximation], []
    if node.op_type == "Clip":
        bounds = clip_bounds(node)
        return ("Clip", list(bounds)) if bounds else f"{node.name}: Clip bounds are not constant"
    return f"{node.name}: {node.op_type} is not an activation"
