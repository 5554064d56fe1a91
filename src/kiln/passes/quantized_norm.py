"""Norms quantize the rows of their output for the INT8/FP8 matrix products that read it.

A calibrated ``kiln::QuantizedMatMul`` quantizes its activation per row (``dynamic``: each row
after SmoothQuant's factors, with its own scale), in a pass of its own that reads the activation
again. Where that activation is a ``kiln::LayerNorm`` or ``kiln::RMSNorm`` output, the norm holds
each row whole when it writes it: it also writes the quantized row and its scale (``q_type``,
:mod:`kiln.ops.fused_norm`), and the product reads those (``x_row_scale``,
:mod:`kiln.ops.quantized`). The values are the same: the norm quantizes its output as stored, in
its float type. A transformer's first attention and FFN products read norms' outputs (BERT's
post-norms, LLaMA's pre-norms): on BERT-base at batch 64 on an H100 each such pass took about
0.01 ms, 24 of them per run.

The products that read one norm's output take its quantized rows when they agree on the type and
on the smoothing factors (one product, in practice, after :class:`~kiln.passes.merge_products.
MergeSiblingProducts`); others keep their own pass. The norm's float output stays, for its other
readers (the residual).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.quantize import FORMATS, X_ROW_SCALE_INPUT, X_SMOOTHING_INPUT
from kiln.passes.rewrite import KILN_DOMAIN, constant, kiln_node

_T = ir.DataType
QUANTIZED_ROW_TYPES = tuple(quant_type for quant_type, _ in FORMATS.values())
NORM_SMOOTHING_INPUT = {"LayerNorm": 4, "RMSNorm": 3}  # the norms' inverse_smooth


def _row_quantizing_reader(node: ir.Node, index: int) -> bool:
    """A QuantizedMatMul quantizing this input (its x) per row, into INT8 or FLOAT8E4M3FN."""
    attributes = node.attributes
    return (
        index == 0 and node.domain == KILN_DOMAIN and node.op_type == "QuantizedMatMul"
        and attributes.get_int("dynamic", 0) == 1
        and _T(attributes.get_int("x_type", _T.INT8)) in QUANTIZED_ROW_TYPES
        and len(node.inputs) <= X_ROW_SCALE_INPUT
    )


def _smoothing(node: ir.Node) -> tuple[ir.Value | None, np.ndarray | None]:
    value = node.inputs[X_SMOOTHING_INPUT] if len(node.inputs) > X_SMOOTHING_INPUT else None
    return value, constant(value)


def _agree(first: ir.Node, other: ir.Node) -> bool:
    if first.attributes.get_int("x_type", _T.INT8) != other.attributes.get_int("x_type", _T.INT8):
        return False
    (value_a, array_a), (value_b, array_b) = _smoothing(first), _smoothing(other)
    if value_a is None or value_b is None:
        return value_a is value_b
    return value_a is value_b or (array_a is not None and array_b is not None
                                  and np.array_equal(array_a, array_b))


class NormsQuantizeRows(GraphPass):
    """Norms write the quantized rows their products read (see the module's docstring)."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        changes: Counter = Counter()
        for norm in list(graph):
            if (norm.domain != KILN_DOMAIN or norm.op_type not in NORM_SMOOTHING_INPUT
                    or norm.attributes.get_int("q_type", 0)):
                continue
            y = norm.outputs[0]
            readers = [node for node, index in y.uses() if _row_quantizing_reader(node, index)]
            if not readers or y.dtype is None or not y.dtype.is_floating_point():
                continue
            readers = [node for node in readers if _agree(readers[0], node)]
            self._quantize_rows(graph, norm, readers)
            changes["NormQuantizesRows"] += 1
            changes["ProductsReadRows"] += len(readers)
        return PassOutcome(model, +changes)

    @staticmethod
    def _quantize_rows(graph: ir.Graph, norm: ir.Node, readers: list[ir.Node]) -> None:
        y = norm.outputs[0]
        name = y.name
        q_type = _T(readers[0].attributes.get_int("x_type", _T.INT8))
        smoothing, _ = _smoothing(readers[0])
        inputs = list(norm.inputs)
        inputs += [None] * (NORM_SMOOTHING_INPUT[norm.op_type] - len(inputs))
        inputs.append(smoothing)
        while inputs[-1] is None:
            inputs.pop()
        attributes = {name: attr.value for name, attr in norm.attributes.items()}
        replacement = kiln_node(norm.op_type, inputs, {**attributes, "q_type": q_type.value},
                                norm.name, num_outputs=len(norm.outputs) + 2)
        replacement.metadata_props.update(norm.metadata_props)
        for old, new in zip(norm.outputs, replacement.outputs):
            new.name, old.name = old.name, None
            new.type, new.shape = old.type, old.shape
        rows, row_scales = replacement.outputs[-2:]
        rows.name, row_scales.name = f"{name}_rows", f"{name}_row_scales"
        rows.type, rows.shape = ir.TensorType(q_type), y.shape
        row_scales.type = ir.TensorType(_T.FLOAT)
        row_scales.shape = ir.Shape(list(y.shape)[:-1]) if y.shape is not None else None
        ir.convenience.replace_nodes_and_values(
            graph, norm, [norm], [replacement], list(norm.outputs), list(replacement.outputs)[:-2]
        )
        for reader in readers:
            reader.replace_input_with(0, rows)
            if len(reader.inputs) > X_SMOOTHING_INPUT:
                reader.replace_input_with(X_SMOOTHING_INPUT, None)
            reader.resize_inputs(X_ROW_SCALE_INPUT + 1)
            reader.replace_input_with(X_ROW_SCALE_INPUT, row_scales)
            reader.attributes["dynamic"] = ir.AttrInt64("dynamic", 0)
            reader.attributes["float_type"] = ir.AttrInt64("float_type", y.dtype.value)
