"""Quantized layers hand their outputs to the next quantized layers already quantized.

Where a ``kiln::QuantizedConv`` or ``kiln::QuantizedMatMul`` (the producer) makes an activation
that only quantized layers read, as their input under one static scale with zero point 0 in
INT8 or FLOAT8E4M3FN, or as their residual, the producer's epilogue writes the quantized values
(``y_type``, ``y_scale``); the readers take them as their input (``float_type`` keeps their
output's float type) or dequantize them as their residual (``residual_scale``), as
:mod:`kiln.ops.quantized` defines. 8 bits cross memory instead of 16, and no kernel quantizes
the activation in between. In ResNet-50 every convolution's output is handed over but those of
the downsampling convolutions (only a residual reads them: no layer gives them a scale) and of
the last block: a bottleneck's output goes quantized to the next block's first convolution (and
its downsampling one) and, as the residual, to its last.

Matrix products calibrated with dynamic per-row scales are left as they are: a static scale for
the input of a transformer's second FFN product (its GELU's output, which other layers' kernels
could then write quantized) took all-MiniLM-L6-v2's worst sentence-embedding cosine to FP32 from
0.996 to 0.94 in INT8 (0.90 with SmoothQuant's factors): some tokens' rows run far larger than
others, which one scale for all cannot resolve.

Run after :class:`~kiln.passes.precision.ReducePrecision`, so that the activation's float type
is the one the consumer's output keeps.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.quantize import QUANTIZED_OPS, X_SMOOTHING_INPUT
from kiln.passes.rewrite import KILN_DOMAIN

_T = ir.DataType
HANDED_TYPES = (_T.INT8, _T.FLOAT8E4M3FN)
_RESIDUAL_INPUT = 4  # of either quantized op


def _quantized_layer(node: ir.Node | None) -> bool:
    return node is not None and node.domain == KILN_DOMAIN and node.op_type in QUANTIZED_OPS


def _static_scale(consumer: ir.Node) -> tuple[_T, float] | None:
    """The type and scale ``consumer`` quantizes its activation with, when it can take it
    quantized: a static scale, zero point 0, INT8 or FLOAT8E4M3FN, no smoothing."""
    attributes = consumer.attributes
    x_type = _T(attributes.get_int("x_type", _T.INT8))
    smoothing = len(consumer.inputs) > X_SMOOTHING_INPUT and consumer.inputs[X_SMOOTHING_INPUT] is not None
    if (x_type not in HANDED_TYPES or attributes.get_int("dynamic", 0) or smoothing
            or (x_type == _T.INT8 and attributes.get_int("x_zero_point", 0))):
        return None
    return x_type, attributes.get_float("x_scale", 0.0)


class HandOffQuantized(GraphPass):
    """Producers write the consumers' quantized values (see the module's docstring)."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        changes: Counter = Counter()
        outputs = {id(value) for value in graph.outputs}
        for producer in graph:
            value = producer.outputs[0] if _quantized_layer(producer) else None
            if (value is None or id(value) in outputs or value.dtype is None
                    or not value.dtype.is_floating_point()):
                continue
            readers = list(value.uses())
            if not all(_quantized_layer(node) and index in (0, _RESIDUAL_INPUT) for node, index in readers):
                continue
            scales = {_static_scale(node) for node, index in readers if index == 0}
            if len(scales) != 1 or None in scales:
                continue  # no layer quantizes it, or they disagree
            x_type, x_scale = scales.pop()  # type: ignore[misc]
            if x_scale <= 0:
                continue
            producer.attributes["y_type"] = ir.AttrInt64("y_type", x_type.value)
            producer.attributes["y_scale"] = ir.AttrFloat32("y_scale", x_scale)
            for node, index in readers:
                if index == 0:
                    node.attributes["float_type"] = ir.AttrInt64("float_type", value.dtype.value)
                else:
                    node.attributes["residual_scale"] = ir.AttrFloat32("residual_scale", x_scale)
            value.type = ir.TensorType(x_type)
            changes["HandedOff"] += 1
            changes["ResidualsHandedOff"] += sum(index != 0 for _, index in readers)
        return PassOutcome(model, +changes)
