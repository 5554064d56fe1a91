"""Reduced precision: run the top-level layers that compute in float32 in float16 or bfloat16.

Run last, after every fusion, so each layer it sees is one the engine executes. A node runs in the
reduced type when it reads and writes float32 (and no other floating type), is not pinned to fp32
by ``layer_precisions``, and is not one of :data:`KEEP_FP32`. Nodes with
subgraphs (If, Loop, Scan, kiln::Pointwise groups) and custom ops stay fp32, bodies included.
Under fp16, a node reading a float32 constant that fp16 cannot hold (|x| > 65504, e.g. a
``finfo(float32).min`` mask fill) stays fp32 as well.

Float32 weights read only by reduced layers are converted in place (the engine stores them in the
reduced type); a weight read by both kinds of layer is kept and a converted copy added. A Cast
goes wherever a reduced value meets an fp32 reader and the other way round; graph inputs and
outputs keep their float32 type, so the engine's signature does not change. Every top-level node
records the precision it computes in under ``kiln.precision`` in its metadata (``inspect`` shows it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.ops.custom import is_custom_op
from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import KILN_DOMAIN, initializer

PRECISION_KEY = "kiln.precision"
REDUCED_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_NUMPY = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
FP16_MAX = 65504.0

# ONNX ops that stay in fp32 under a reduced policy, and why. (Fused kiln ops need no entry: they
# keep their statistics in fp32 themselves.)
KEEP_FP32 = {
    # Sums and products over many elements overflow fp16 and lose bf16's 8-bit mantissa.
    **dict.fromkeys(
        ("ReduceSum", "ReduceProd", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
         "ReduceLogSumExp", "CumSum"),
        "accumulates over large axes",
    ),
    # exp(12) already overflows fp16; Log and Pow amplify the input's rounding error.
    **dict.fromkeys(("Exp", "Log", "Pow"), "range: overflows or amplifies rounding"),
    # Softmax's normalizing sum accumulates in fp32 (design §4).
    **dict.fromkeys(("Softmax", "LogSoftmax"), "normalization statistics stay fp32"),
    # Sequences: a Cast cannot convert them, and shape inference may type them as tensors.
    **dict.fromkeys(
        ("SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
         "SplitToSequence", "ConcatFromSequence", "SequenceMap"),
        "reads or writes a sequence",
    ),
    # Their output type is an attribute, not the input's: converting them is the user's call.
    **dict.fromkeys(
        ("Cast", "EyeLike", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"),
        "output type set by an attribute",
    ),
}
# Inputs ONNX requires to be float32 whatever the data's type (or typed independently of it).
FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Dropout": {1}}
# kiln ops' inputs that stay float32: quantized layers' weight scales and smoothing factors.
KILN_FP32_INPUTS = {"QuantizedConv": {2}, "QuantizedMatMul": {2, 5}}


class ReducePrecision(GraphPass):
    """Run top-level float32 layers in ``precision`` ("fp16" or "bf16"), but the ``pinned``
    ones (names of layers kept in fp32)."""

    def __init__(self, precision: str, pinned: Iterable[str] = ()) -> None:
        if precision not in REDUCED_TYPES:
            raise ValueError(f"ReducePrecision: {precision!r} is not a reduced precision")
        self.precision = precision
        self.target = REDUCED_TYPES[precision]
        self.pinned = set(pinned)

    def __call__(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        changes: Counter = Counter()
        _name_nodes(graph)
        reduced = [node for node in graph if self._reducible(node)]
        reduced_ids = {id(node) for node in reduced}
        changes["PinnedFp32"] = sum(1 for node in graph if node.name in self.pinned)
        for node in graph:
            if node.domain == KILN_DOMAIN and node.op_type in KILN_FP32_INPUTS:
                continue  # quantized layers keep their int8/fp8 mark; only their float I/O narrows
            node.metadata_props[PRECISION_KEY] = self.precision if id(node) in reduced_ids else "fp32"
        names = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
        names |= set(graph.initializers)
        casts_in: dict[int, ir.Value] = {}
        weights: dict[int, ir.Value] = {}
        for node in reduced:
            for index in _converted_inputs(node):
                value = node.inputs[index]
                assert value is not None
                if _is_weight(value):
                    if id(value) not in weights:
                        weights[id(value)] = self._convert_weight(graph, value, reduced_ids)
                        changes["ConvertedWeights"] += 1
                    node.replace_input_with(index, weights[id(value)])
                elif not _made_by(value, reduced_ids):
                    if id(value) not in casts_in:
                        cast = self._cast(value, self.target, names, self.precision)
                        graph.insert_before(node, cast)
                        casts_in[id(value)] = cast.outputs[0]
                        changes["CastsIn"] += 1
                    node.replace_input_with(index, casts_in[id(value)])
        for node in reduced:
            for value in node.outputs:
                if value.dtype != ir.DataType.FLOAT:
                    continue
                changes["CastsOut"] += self._cast_out(graph, node, value, reduced_ids, names)
                value.type = ir.TensorType(self.target)
        changes["ReducedLayers"] = len(reduced)
        return PassOutcome(model, +changes)

    def _reducible(self, node: ir.Node) -> bool:
        if node.name in self.pinned or node.domain not in ("", KILN_DOMAIN):
            return False
        if is_custom_op(node.domain, node.op_type) or _has_subgraph(node):
            return False
        if node.domain == "" and node.op_type in KEEP_FP32:
            return False
        quantized_weight = 1 if node.domain == KILN_DOMAIN and node.op_type in KILN_FP32_INPUTS else -1
        floats = [v for i, v in enumerate([*node.inputs, *node.outputs])
                  if v is not None and i != quantized_weight]  # an fp8 weight is not a float to narrow
        if any(v.dtype is None and not _is_weight(v) for v in floats):
            return False  # unknown type: leave it as it is
        if any(v.dtype is not None and v.dtype.is_floating_point()
               and (v.dtype != ir.DataType.FLOAT or not isinstance(v.type, ir.TensorType))
               for v in floats):
            return False  # another float type, or float sequences (a Cast cannot convert them)
        if not any(v.dtype == ir.DataType.FLOAT for v in node.outputs if v is not None):
            return False  # computes no float (Shape, comparisons, ArgMax): nothing to reduce
        converted = _converted_inputs(node)
        if not converted:
            return False
        if self.precision == "fp16":
            return all(_fits_fp16(node.inputs[i]) for i in converted)
        return True

    def _convert_weight(self, graph: ir.Graph, value: ir.Value, reduced_ids: set[int]) -> ir.Value:
        assert value.const_value is not None
        array = value.const_value.numpy().astype(_NUMPY[self.precision])
        if all(id(user) in reduced_ids and index in _converted_inputs(user)
               for user, index in value.uses()) and not value.is_graph_output():
            value.const_value = ir.tensor(array, name=value.name)
            value.type = ir.TensorType(self.target)
            return value
        return initializer(graph, f"{value.name}_{self.precision}", array)

    def _cast(self, value: ir.Value, to: ir.DataType, names: set[str], suffix: str) -> ir.Node:
        name = _unique(f"{value.name}_{suffix}", names)
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to.value)], name=f"Cast_{name}")
        cast.outputs[0].name = name
        cast.outputs[0].type = ir.TensorType(to)
        cast.outputs[0].shape = value.shape
        cast.metadata_props[PRECISION_KEY] = "fp32" if to == ir.DataType.FLOAT else self.precision
        return cast

    def _cast_out(self, graph: ir.Graph, node: ir.Node, value: ir.Value, reduced_ids: set[int],
                  names: set[str]) -> int:
        """Give the fp32 readers of ``value`` (and the graph's outputs) an fp32 copy of it."""
        fp32_uses = [(user, index) for user, index in value.uses()
                     if id(user) not in reduced_ids or index not in _converted_inputs(user)]
        outputs = [i for i, out in enumerate(graph.outputs) if out is value]
        if not fp32_uses and not outputs:
            return 0
        cast = self._cast(value, ir.DataType.FLOAT, names, "fp32")
        graph.insert_after(node, cast)
        wide = cast.outputs[0]
        for user, index in fp32_uses:
            user.replace_input_with(index, wide)
        if outputs:  # the output keeps its name and type; the reduced value is renamed
            reduced_name = _unique(f"{value.name}_{self.precision}", names)
            wide.name, value.name = value.name, None
            value.name = reduced_name
            for i in outputs:
                graph.outputs[i] = wide
        return 1


def _unique(base: str, names: set[str]) -> str:
    name, n = base, 1
    while name in names:
        name, n = f"{base}_{n}", n + 1
    names.add(name)
    return name


def _name_nodes(graph: ir.Graph) -> None:
    """Name unnamed nodes as lowering would, so layer names do not shift when Casts go in."""
    for index, node in enumerate(graph):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def _converted_inputs(node: ir.Node) -> list[int]:
    """Indices of the float32 inputs a reduced ``node`` reads in the reduced type."""
    table = FP32_INPUTS if node.domain == "" else KILN_FP32_INPUTS if node.domain == KILN_DOMAIN else {}
    keep = table.get(node.op_type, set())
    return [i for i, v in enumerate(node.inputs)
            if v is not None and i not in keep and v.dtype == ir.DataType.FLOAT]


def _is_weight(value: ir.Value) -> bool:
    return value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def _made_by(value: ir.Value, node_ids: set[int]) -> bool:
    producer = value.producer()
    return producer is not None and id(producer) in node_ids


def _fits_fp16(value: ir.Value | None) -> bool:
    if value is None or not _is_weight(value):
        return True
    assert value.const_value is not None
    array = value.const_value.numpy()
    finite = array[np.isfinite(array)]
    return finite.size == 0 or float(np.abs(finite).max()) <= FP16_MAX


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values())
