"""A sequence split that is only ever indexed at constant positions becomes a plain ``Split``.

Torch's exporter writes ``x.split(n, dim)`` and ``x.chunk(k, dim)`` as ``SplitToSequence``
followed by one ``SequenceAt(sequence, i)`` per part used. Sequences stop the passes after this
one: fusion rules do not look through them and reduced precision keeps them in fp32. When the
parts can be counted and every reader takes one at a constant position, one ``Split`` with an
output per part computes the same, each reader's result becoming the matching output (through a
``Squeeze`` where ``keepdims=0`` without sizes drops the split axis). Parts nobody reads stay as
unused outputs of the Split.

The pass runs after simplification, where positions and sizes computed from shapes are folded
into constants and twin ``SequenceAt`` nodes are merged.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import SOURCE_OPS_KEY, SOURCES_KEY, constant, initializer, sources_of

logger = logging.getLogger("kiln.passes.split_sequence")

MIN_OPSET = 13  # Split takes its sizes as an input from opset 13 on


def split_sequence() -> GraphPass:
    return SplitSequenceToSplit()


@dataclass
class _Parts:
    """A SplitToSequence whose parts are known, and the SequenceAt nodes reading them."""

    node: ir.Node
    axis: int  # as the node gives it (it may count from the back)
    sizes: list[int]
    squeeze: bool  # keepdims=0 without sizes: the parts lose the axis
    readers: list[tuple[ir.Node, int]]  # (SequenceAt, the part it reads)


class SplitSequenceToSplit(GraphPass):
    """SplitToSequence(x) read only by SequenceAt at constant positions -> Split(x) (+ Squeeze)."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        changes: Counter = Counter()
        opset = model.opset_imports.get("")
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type != "SplitToSequence" or node.domain != "" or node.graph is not graph:
                    continue
                found = self.match(node, opset)
                if isinstance(found, str):
                    logger.debug("not rewriting %s: %s", node.name, found)
                    continue
                self.rewrite(graph, found)
                changes[self.name] += 1
        return PassOutcome(model, changes)

    def match(self, node: ir.Node, opset: int | None) -> _Parts | str:
        """The parts of ``node`` and their readers, or why it cannot become a Split."""
        name = node.name or "SplitToSequence"
        if opset is None or opset < MIN_OPSET:
            return f"{name}: the default domain's opset is {opset}, Split needs {MIN_OPSET}"
        sequence = node.outputs[0]
        if sequence.is_graph_output():
            return f"{name}: the sequence is a graph output"
        axis = node.attributes.get_int("axis", 0)
        found = _sizes(node, axis)
        if isinstance(found, str):
            return f"{name}: {found}"
        sizes, squeeze = found
        readers = []
        for user, index in sequence.uses():
            if user.op_type != "SequenceAt" or user.domain != "" or index != 0:
                return f"{name}: the sequence is read by {user.op_type} {user.name!r}"
            if user.graph is not node.graph:
                return f"{name}: the sequence is read by {user.name!r} in another graph"
            position = constant(user.inputs[1])
            if position is None or position.size != 1 or position.dtype.kind not in "iu":
                return f"{name}: {user.name!r} reads at a position that is not a constant integer"
            part = int(position.reshape(-1)[0])
            if not -len(sizes) <= part < len(sizes):
                return f"{name}: {user.name!r} reads position {part} of {len(sizes)}"
            readers.append((user, part % len(sizes)))
        if not readers:
            return f"{name}: nothing reads the sequence"
        exposed = Counter(part for user, part in readers if user.outputs[0].is_graph_output())
        if any(count > 1 for count in exposed.values()):
            return f"{name}: one part is two graph outputs"
        return _Parts(node, axis, sizes, squeeze, readers)

    def rewrite(self, graph: ir.Graph, parts: _Parts) -> None:
        """Put a Split (and Squeezes) where the SplitToSequence was; drop it and its readers."""
        node, x = parts.node, parts.node.inputs[0]
        name = node.name or "split"
        sizes = _sizes_value(graph, node, parts.sizes, name)
        split = ir.Node("", "Split", [x, sizes], [ir.AttrInt64("axis", parts.axis)],
                        num_outputs=len(parts.sizes), name=name)
        new_nodes, results = [split], list(split.outputs)
        for part, value in enumerate(split.outputs):
            value.type, value.shape = x.type, _part_shape(x, parts.axis, parts.sizes[part], keep=True)
        if parts.squeeze:
            axes = initializer(graph, f"{name}_axes", np.array([parts.axis], np.int64))
            for part in sorted({part for _, part in parts.readers}):
                squeeze = ir.Node("", "Squeeze", [split.outputs[part], axes], num_outputs=1,
                                  name=f"{name}_squeeze{part}")
                squeeze.outputs[0].type = x.type
                squeeze.outputs[0].shape = _part_shape(x, parts.axis, 1, keep=False)
                new_nodes.append(squeeze)
                results[part] = squeeze.outputs[0]
        old_nodes = [node, *(user for user, _ in parts.readers)]
        sources, source_ops = sources_of(old_nodes)
        for new in new_nodes:
            new.metadata_props[SOURCES_KEY] = json.dumps(sources)
            new.metadata_props[SOURCE_OPS_KEY] = json.dumps(source_ops)
        # Each part read takes the name of one reader: the graph output's, when one is.
        named: set[int] = set()
        for user, part in sorted(parts.readers, key=lambda r: not r[0].outputs[0].is_graph_output()):
            old, new = user.outputs[0], results[part]
            if part not in named:
                named.add(part)
                new.name, old.name = old.name, None
                new.type = old.type if new.type is None else new.type
                new.shape = old.shape if new.shape is None else new.shape
        graph.insert_after(node, new_nodes)
        for user, part in parts.readers:
            ir.convenience.replace_all_uses_with(user.outputs[0], results[part],
                                                 replace_graph_outputs=True)
        graph.remove(old_nodes, safe=True)


def _sizes(node: ir.Node, axis: int) -> tuple[list[int], bool] | str:
    """The sizes of the parts along ``axis`` and whether the axis is squeezed, or why unknown."""
    value = node.inputs[1] if len(node.inputs) > 1 else None
    if value is None:  # parts of one; keepdims only applies here
        length = _static_length(node.inputs[0], axis)
        if isinstance(length, str):
            return length
        return [1] * length, not node.attributes.get_int("keepdims", 1)
    split = constant(value)
    if split is None or split.dtype.kind not in "iu":
        return "the split sizes are not a constant integer tensor"
    if split.ndim == 1:
        sizes = [int(s) for s in split]
        if not sizes or min(sizes) < 0:
            return f"the split sizes {sizes} are not lengths"
        length = _static_length(node.inputs[0], axis)
        if isinstance(length, int) and sum(sizes) != length:
            return f"the split sizes {sizes} do not add up to the axis' {length}"
        return sizes, False
    if split.ndim != 0:
        return f"the split sizes have rank {split.ndim}"
    chunk = int(split)
    if chunk <= 0:
        return f"the split size {chunk} is not positive"
    length = _static_length(node.inputs[0], axis)
    if isinstance(length, str):
        return length
    count = -(-length // chunk)
    return [chunk] * (count - 1) + [length - chunk * (count - 1)], False


def _static_length(x: ir.Value, axis: int) -> int | str:
    """The size of ``x`` along ``axis`` when it is static and not zero, or why not."""
    if x.shape is None:
        return "the input's shape is unknown"
    rank = len(x.shape)
    if not -rank <= axis < rank:
        return f"axis {axis} is outside the input's rank {rank}"
    length = x.shape[axis]
    if not isinstance(length, int):
        return f"the input's size along axis {axis} is not static"
    if length <= 0:
        return "the input is empty along the split axis"
    return length


def _sizes_value(graph: ir.Graph, node: ir.Node, sizes: list[int], name: str) -> ir.Value:
    """The SplitToSequence's own sizes when Split can read them (int64, 1-D), else new ones."""
    given = node.inputs[1] if len(node.inputs) > 1 else None
    if given is not None and given.dtype == ir.DataType.INT64 and given.shape is not None \
            and len(given.shape) == 1:
        return given
    return initializer(graph, f"{name}_sizes", np.array(sizes, np.int64))


def _part_shape(x: ir.Value, axis: int, size: int, keep: bool) -> ir.Shape | None:
    """The shape of one part of ``x``: ``size`` along ``axis``, or without it."""
    if x.shape is None:
        return None
    dims = list(x.shape)
    axis = axis % len(dims) if -len(dims) <= axis < len(dims) else None
    if axis is None:
        return None
    dims[axis:axis + 1] = [size] if keep else []
    return ir.Shape(dims)
