"""Sibling matrix products merged into one: attention's Q, K and V projections, for one.

``kiln::FusedMatMul`` nodes (and MatMuls by a constant matrix, products with no epilogue) that
read the same A, each with a constant weight of the same depth
and the same epilogue (no residual; the same activation, scale factors and transposes; each with
a constant bias or none), become one FusedMatMul over their weights side by side, and a Split of
its output along the last axis gives each product its columns back (as views: no copy); when the
three are the Q, K and V of one attention, the attention reads the merged product packed instead. One GEMM
N1 + N2 + N3 columns wide keeps the tensor cores busier than three narrow ones and launches once:
at batch 1 a transformer layer's projections cost launches more than arithmetic. TensorRT calls
this horizontal fusion.

It runs after the fusions (so the products carry their epilogues and attention has taken the
projections' outputs as they are) and leaves alone the layers named in ``pinned``, whose names
must survive for ``layer_precisions``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import (
    KILN_DOMAIN, KILN_OPSET, SOURCE_OPS_KEY, SOURCES_KEY, constant, initializer, kiln_node, sources_of,
)

FUSED = "FusedMatMul"
SPLIT_INPUT_OPSET = 13  # Split takes its sizes as an input from opset 13


def _is_product(node: ir.Node) -> bool:
    """A FusedMatMul, or a MatMul left bare (nothing to fuse into it) by a constant weight."""
    if len(node.outputs) != 1:
        return False
    return (node.domain, node.op_type) in ((KILN_DOMAIN, FUSED), ("", "MatMul"))


def _merge_key(node: ir.Node) -> tuple | None:
    """What siblings must share to merge, or None when ``node`` cannot merge at all."""
    if not _is_product(node):
        return None
    a, b, bias, residual = [*node.inputs, None, None][:4]
    attrs = node.attributes
    weight = constant(b)
    if a is None or weight is None or weight.ndim != 2 or residual is not None:
        return None
    if attrs.get_int("trans_a", 0) or node.outputs[0].is_graph_output():
        return None
    trans_b = attrs.get_int("trans_b", 0)
    columns = weight.shape[0] if trans_b else weight.shape[1]
    if bias is not None:
        bias_array = constant(bias)
        if bias_array is None or bias_array.shape != (columns,):
            return None
    return (
        id(a), trans_b, weight.shape[1] if trans_b else weight.shape[0], weight.dtype.str,
        attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0),
        attrs.get_string("activation", ""), tuple(attrs.get_floats("activation_params", [])),
        bias is not None,
    )


class MergeSiblingProducts(GraphPass):
    def __init__(self, pinned: Iterable[str] = ()) -> None:
        self.pinned = frozenset(pinned)

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        if model.opset_imports.get("", 0) < SPLIT_INPUT_OPSET:
            return PassOutcome(model, changes)
        groups: dict[tuple, list[ir.Node]] = defaultdict(list)
        for node in model.graph:
            key = _merge_key(node)
            if key is not None and node.name not in self.pinned:
                groups[key].append(node)
        for siblings in groups.values():
            if len(siblings) > 1:
                _merge(model.graph, siblings)
                changes["MergedProducts"] += len(siblings)
        if changes:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_OPSET)
        return PassOutcome(model, changes)


def _merge(graph: ir.Graph, siblings: list[ir.Node]) -> None:
    """One product and a Split in place of ``siblings`` (in graph order)."""
    first = siblings[0]
    trans_b = first.attributes.get_int("trans_b", 0)
    weights = [constant(node.inputs[1]) for node in siblings]
    widths = [w.shape[0] if trans_b else w.shape[1] for w in weights]
    inputs = [first.inputs[0], initializer(graph, f"{first.name}_merged_weight",
                                           np.concatenate(weights, axis=0 if trans_b else 1))]
    if len(first.inputs) > 2 and first.inputs[2] is not None:
        inputs.append(initializer(graph, f"{first.name}_merged_bias",
                                  np.concatenate([constant(node.inputs[2]) for node in siblings])))
    attributes = {name: attr.value for name, attr in first.attributes.items()}
    merged = kiln_node(FUSED, inputs, attributes, f"{first.name}_merged")
    product = merged.outputs[0]
    product.name = f"{first.outputs[0].name}_merged"
    product.type = first.outputs[0].type
    part_shape = first.outputs[0].shape
    if part_shape is not None and len(part_shape) > 0:  # the parts' dims, the widths summed
        product.shape = ir.Shape([*list(part_shape)[:-1], sum(widths)])
    sources, source_ops = sources_of(siblings)
    merged.metadata_props[SOURCES_KEY] = json.dumps(sources)
    merged.metadata_props[SOURCE_OPS_KEY] = json.dumps(source_ops)
    attention = _attention_of(siblings, widths)
    if attention is not None:  # Q, K and V of one attention: it reads them packed, unsplit
        graph.insert_before(first, merged)
        for index, value in enumerate((product, None, None)):
            attention.replace_input_with(index, value)
        attention.attributes["layout"] = ir.AttrString("layout", "bsd_packed")
        graph.remove(siblings, safe=True)
        return
    sizes = initializer(graph, f"{first.name}_merged_widths", np.array(widths, np.int64))
    split = ir.Node("", "Split", [product, sizes], [ir.AttrInt64("axis", -1)],
                    num_outputs=len(siblings), name=f"{first.name}_merged_split")
    split.metadata_props[SOURCES_KEY] = json.dumps(sources)
    split.metadata_props[SOURCE_OPS_KEY] = json.dumps(source_ops)
    graph.insert_before(first, [merged, split])
    for node, part in zip(siblings, split.outputs):
        old = node.outputs[0]
        part.type, part.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, part)
        part.name, old.name = old.name, None
    graph.remove(siblings, safe=True)


def _attention_of(siblings: list[ir.Node], widths: list[int]) -> ir.Node | None:
    """The ``kiln::Attention`` (``layout="bsd"``) that alone reads the three products as its Q, K
    and V, in that order: ``layout="bsd_packed"`` reads the merged product as it is."""
    if len(siblings) != 3 or len(set(widths)) != 1:
        return None
    uses = [list(node.outputs[0].uses()) for node in siblings]
    if any(len(u) != 1 for u in uses):
        return None
    users = {id(u[0][0]) for u in uses}
    attention = uses[0][0][0]
    if (
        len(users) != 1 or [u[0][1] for u in uses] != [0, 1, 2]
        or (attention.domain, attention.op_type) != (KILN_DOMAIN, "Attention")
        or attention.attributes.get_string("layout", "bsd") != "bsd"
    ):
        return None
    return attention
