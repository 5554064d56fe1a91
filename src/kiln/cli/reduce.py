"""Shrink an ONNX model to a minimal subgraph on which a check still fails.

:class:`Subgraphs` cuts a model down to any subset of its top-level nodes and keeps it valid
ONNX: values the subset reads but no kept node makes become graph inputs (typed by shape
inference), values it makes but does not read become graph outputs, unused initializers go, and
the result must pass ``onnx.checker``. :func:`minimize` is delta debugging (Zeller's ddmin) over
the node indices: it splits the nodes into chunks, keeps a chunk or the complement of one that
still fails, and refines the chunks until no single node can go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import onnx

Fails = Callable[[Sequence[int]], bool]


class Subgraphs:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.graph_name = model.graph.name
        self.initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self.types = _value_types(model)
        self.model_outputs = {output.name for output in model.graph.output}
        # Everything but the graph (opsets, functions, metadata), copied into each candidate.
        self.shell = onnx.ModelProto()
        self.shell.CopyFrom(model)
        self.shell.ClearField("graph")

    def extract(self, keep: Iterable[int]) -> onnx.ModelProto | None:
        """The model of the nodes at ``keep``; None when it cannot be valid ONNX."""
        nodes = [self.nodes[i] for i in sorted(set(keep))]
        if not nodes:
            return None
        made = {name for node in nodes for name in node.output if name}
        reads = list(dict.fromkeys(name for node in nodes for name in _reads(node)))
        inputs = [name for name in reads if name not in made and name not in self.initializers]
        read = set(reads)
        outputs = [
            name for node in nodes for name in node.output
            if name and (name not in read or name in self.model_outputs)
        ]
        if any(name not in self.types for name in inputs):
            return None  # an input of unknown type cannot be declared
        graph = onnx.helper.make_graph(
            nodes,
            self.graph_name,
            [self.types[name] for name in inputs],
            [self.types.get(name) or onnx.ValueInfoProto(name=name) for name in outputs],
            [self.initializers[name] for name in reads if name in self.initializers],
            value_info=[
                self.types[name] for node in nodes for name in node.output
                if name in self.types and name not in outputs
            ],
        )
        reduced = onnx.ModelProto()
        reduced.CopyFrom(self.shell)
        reduced.graph.CopyFrom(graph)
        if not _type_outputs(reduced):
            return None
        try:
            onnx.checker.check_model(reduced)
        except onnx.checker.ValidationError:
            return None
        return reduced


def minimize(count: int, fails: Fails) -> list[int]:
    """A 1-minimal subset of ``range(count)`` on which ``fails`` holds (it must hold on all)."""
    items = list(range(count))
    granularity = 2
    while len(items) >= 2:
        chunks = _split(items, granularity)
        reduced = False
        for chunk in chunks:
            if fails(chunk):
                items, granularity, reduced = chunk, 2, True
                break
        if not reduced and granularity > 2:  # with two chunks, each complement is the other chunk
            for chunk in chunks:
                dropped = set(chunk)
                complement = [i for i in items if i not in dropped]
                if fails(complement):
                    items, granularity, reduced = complement, max(granularity - 1, 2), True
                    break
        if not reduced:
            if granularity >= len(items):
                break
            granularity = min(len(items), 2 * granularity)
    return items


def _split(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        chunks.append(items[start:end])
        start = end
    return [chunk for chunk in chunks if chunk]


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Each value's declared or inferred type, by name (inputs, intermediates, outputs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = model.graph
    types: dict[str, onnx.ValueInfoProto] = {}
    for tensor in model.graph.initializer:
        types[tensor.name] = onnx.helper.make_tensor_value_info(
            tensor.name, tensor.data_type, list(tensor.dims)
        )
    for info in [*inferred.input, *inferred.value_info, *inferred.output]:
        if info.type.WhichOneof("value") is not None:
            types[info.name] = info
    return types


def _type_outputs(model: onnx.ModelProto) -> bool:
    """Give untyped graph outputs the types shape inference finds; False if some stay untyped."""
    untyped = [o for o in model.graph.output if o.type.WhichOneof("value") is None]
    if not untyped:
        return True
    types = _value_types(model)
    for output in untyped:
        if output.name not in types:
            return False
        output.CopyFrom(types[output.name])
    return True


def _reads(node: onnx.NodeProto) -> list[str]:
    """What ``node`` reads: its inputs, and names its subgraphs take from the enclosing scope."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            names += _free_names(graph)
    return names


def _free_names(graph: onnx.GraphProto) -> list[str]:
    defined = {info.name for info in graph.input} | {t.name for t in graph.initializer}
    free = []
    for node in graph.node:
        free += [name for name in _reads(node) if name not in defined]
        defined.update(node.output)
    return free
