"""Turn an onnx_ir model into kernel groups in execution order.

Each node becomes one :class:`Step` (fusion passes have already merged what belongs together).
Tensors the model carries — initializers and tensor attributes — are collected under unique keys
for the engine file; graph attributes (If, Loop, Scan bodies) are lowered recursively. For every
step the lowering also lists the values whose last use it is, so the runtime can release them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.errors import ModelError, UnsupportedOpError
from kiln.lowering.pointwise_body import describe_body
from kiln.lowering.spec import KernelSpec, ValueType
from kiln.ops.registry import lookup, normalize_domain
from kiln.passes.rewrite import KILN_DOMAIN, SOURCE_OPS_KEY, SOURCES_KEY


@dataclass
class Step:
    name: str
    spec: KernelSpec
    inputs: list[str | None]
    outputs: list[str | None]
    attributes: dict[str, Any]  # encoded; graph attributes hold LoweredGraph objects
    sources: list[str]
    source_ops: list[str]
    release: list[str] = field(default_factory=list)


@dataclass
class LoweredGraph:
    name: str
    inputs: list[str]
    outputs: list[str]
    input_types: list[ValueType | None]
    output_types: list[ValueType | None]
    weights: dict[str, str]  # value name -> key in LoweredModel.tensors
    steps: list[Step]
    release_unused_inputs: list[str]


@dataclass
class LoweredModel:
    graph: LoweredGraph
    tensors: dict[str, np.ndarray]
    opset_imports: dict[str, int]


def value_type(value: ir.Value) -> ValueType | None:
    return _type_of(value.type, value.shape)


def _type_of(vtype: ir.TypeProtocol | None, shape: ir.Shape | None) -> ValueType | None:
    if vtype is None:
        return None
    dims = None if shape is None else tuple(_dim(d) for d in shape)
    if isinstance(vtype, ir.TensorType):
        return ValueType("tensor", vtype.dtype.value, dims)
    element = vtype.elem_type
    if isinstance(vtype, ir.SequenceType):
        return ValueType("sequence", _element_dtype(element), None)
    if isinstance(vtype, ir.OptionalType):
        kind = "optional_sequence" if isinstance(element, ir.SequenceType) else "optional"
        return ValueType(kind, _element_dtype(element), None)
    return ValueType("tensor", vtype.dtype.value, dims)


def _element_dtype(vtype: ir.TypeProtocol) -> int:
    while not isinstance(vtype, ir.TensorType):
        vtype = vtype.elem_type
    return vtype.dtype.value


def _dim(dim: int | ir.SymbolicDim) -> int | str | None:
    return dim if isinstance(dim, int) else dim.value


class _Lowerer:
    def __init__(self, model: ir.Model) -> None:
        self.opsets = {normalize_domain(d): v for d, v in model.opset_imports.items()}
        self.tensors: dict[str, np.ndarray] = {}
        self.step_names: set[str] = set()

    def add_tensor(self, key: str, tensor: ir.TensorProtocol) -> str:
        unique, n = key, 1
        while unique in self.tensors:
            unique, n = f"{key}~{n}", n + 1
        self.tensors[unique] = tensor.numpy()
        return unique

    def step_name(self, node: ir.Node, index: int) -> str:
        base = node.name or f"{node.op_type}_{index}"
        name, n = base, 1
        while name in self.step_names:
            name, n = f"{base}_{n}", n + 1
        self.step_names.add(name)
        return name

    def lower_graph(self, graph: ir.Graph, scope: str) -> LoweredGraph:
        weights = {
            name: self.add_tensor(f"{scope}{name}", value.const_value)
            for name, value in graph.initializers.items()
            if value.const_value is not None
        }
        steps = [self.lower_node(node, i) for i, node in enumerate(graph)]
        lowered = LoweredGraph(
            name=graph.name or "main",
            inputs=[v.name for v in graph.inputs if v.name not in weights],
            outputs=[v.name for v in graph.outputs],
            input_types=[value_type(v) for v in graph.inputs if v.name not in weights],
            output_types=[value_type(v) for v in graph.outputs],
            weights=weights,
            steps=steps,
            release_unused_inputs=[],
        )
        _plan_releases(lowered)
        return lowered

    def lower_node(self, node: ir.Node, index: int) -> Step:
        domain = normalize_domain(node.domain)
        opset = self.opsets.get(domain)
        name = self.step_name(node, index)
        if opset is None:
            raise ModelError(f"node {name!r} uses domain {domain!r}, which the model does not import")
        lookup(node.op_type, opset, domain, name)  # unsupported ops fail here, at build time
        attributes = {
            attr_name: self.encode_attribute(attr, f"{name}::{attr_name}", name)
            for attr_name, attr in node.attributes.items()
        }
        spec_attributes = {k: v for k, v in attributes.items() if "graph" not in v and "graphs" not in v}
        if (domain, node.op_type) == (KILN_DOMAIN, "Pointwise"):  # what the group computes
            spec_attributes["body"] = {"pointwise": describe_body(node.attributes["body"].value)}
        spec = KernelSpec.create(
            node.op_type,
            domain,
            opset,
            spec_attributes,
            tuple(None if v is None else value_type(v) for v in node.inputs),
            tuple(value_type(v) for v in node.outputs),
        )
        return Step(
            name=name,
            spec=spec,
            inputs=[v.name if v is not None and v.name else None for v in node.inputs],
            outputs=[v.name or None for v in node.outputs],
            attributes=attributes,
            sources=json.loads(node.metadata_props.get(SOURCES_KEY, "null")) or [node.name or name],
            source_ops=json.loads(node.metadata_props.get(SOURCE_OPS_KEY, "null")) or [node.op_type],
        )

    def encode_attribute(self, attr: ir.Attr, key: str, step: str) -> dict[str, Any]:
        kind, value = attr.type, attr.value
        A = ir.AttributeType
        if kind == A.INT:
            return {"int": int(value)}
        if kind == A.FLOAT:
            return {"float": float(value)}
        if kind == A.STRING:
            return {"string": value.decode() if isinstance(value, bytes) else value}
        if kind == A.INTS:
            return {"ints": [int(v) for v in value]}
        if kind == A.FLOATS:
            return {"floats": [float(v) for v in value]}
        if kind == A.STRINGS:
            return {"strings": [v.decode() if isinstance(v, bytes) else v for v in value]}
        if kind == A.TENSOR:
            return {"tensor": self.add_tensor(key, value)}
        if kind == A.TENSORS:
            return {"tensors": [self.add_tensor(f"{key}[{i}]", t) for i, t in enumerate(value)]}
        if kind == A.GRAPH:
            return {"graph": self.lower_graph(value, f"{key}/")}
        if kind == A.GRAPHS:
            return {"graphs": [self.lower_graph(g, f"{key}[{i}]/") for i, g in enumerate(value)]}
        if kind == A.TYPE_PROTO:
            return {"type": _type_of(value.type, value.shape).to_json()}
        raise UnsupportedOpError(
            f"node {step!r}: attribute {attr.name!r} of type {kind.name} is not supported by kiln"
        )


def _subgraphs(step: Step) -> list[LoweredGraph]:
    found = []
    for encoded in step.attributes.values():
        found.extend([encoded["graph"]] if "graph" in encoded else encoded.get("graphs", []))
    return found


def free_values(graph: LoweredGraph) -> set[str]:
    """Names a graph reads from enclosing scopes."""
    defined = set(graph.inputs) | set(graph.weights)
    used: set[str] = set()
    for step in graph.steps:
        used.update(_reads(step) - defined)
        defined.update(o for o in step.outputs if o)
    used.update(o for o in graph.outputs if o not in defined)
    return used


def _reads(step: Step) -> set[str]:
    reads = {i for i in step.inputs if i}
    for sub in _subgraphs(step):
        reads |= free_values(sub)
    return reads


def _plan_releases(graph: LoweredGraph) -> None:
    """Mark, for each step, the values of this graph it reads or makes for the last time."""
    keep = set(graph.outputs) | set(graph.weights)
    local = set(graph.inputs)
    last_use: dict[str, int] = {}
    for index, step in enumerate(graph.steps):
        for name in _reads(step):
            last_use[name] = index
        for name in step.outputs:
            if name:
                local.add(name)
                last_use.setdefault(name, index)
    for name, index in last_use.items():
        if name in local and name not in keep:
            graph.steps[index].release.append(name)
    graph.release_unused_inputs = [n for n in graph.inputs if n not in last_use and n not in keep]


def lower(model: ir.Model) -> LoweredModel:
    lowerer = _Lowerer(model)
    graph = lowerer.lower_graph(model.graph, "")
    return LoweredModel(graph=graph, tensors=lowerer.tensors, opset_imports=lowerer.opsets)
