"""INT8 and FP8 quantization of convolutions and matrix products (design §4).

A layer is quantized when its weight is constant and its activation input has a scale, from one
of two sources:

- **explicit**: the model carries QuantizeLinear -> DequantizeLinear pairs (quantization-aware
  training, ONNX Runtime's ``quantize_static`` in QDQ format, NVIDIA ModelOpt).
  :class:`ReadQuantization` runs first: each Q -> DQ pair on an activation is removed and its
  scale, zero point and type recorded under the activation's name; each DequantizeLinear of a
  constant (weights, biases) becomes the float constant it stands for, weights' scales recorded
  under the constant's name. What follows works on a float graph, so every fusion applies.
- **calibrated**: under the ``int8`` / ``fp8`` policies the builder observes the activations
  :func:`calibration_targets` names on calibration data and passes their ranges in.

:class:`QuantizeLayers` runs after every fusion and before :class:`~kiln.passes.precision.
ReducePrecision`: Conv, MatMul and Gemm, and the fused kiln ops they became, turn into
``kiln::QuantizedConv`` / ``kiln::QuantizedMatMul`` (see :mod:`kiln.ops.quantized`) with
symmetric per-output-channel weights. A weight keeps the model's own scales when they still
describe it exactly (fusions such as BatchNorm folding change weights; those are requantized from
their range). Scales are keyed by value name because fusions replace nodes but keep the names of
the values they produce.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.errors import ConfigError
from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.calibration import AMAX_FLOOR, FORMAT_MAX, scale_for
from kiln.passes.fuse_matmul import FusedProduct
from kiln.passes.precision import PRECISION_KEY
from kiln.passes.rewrite import KILN_DOMAIN, KILN_OPSET, constant, initializer, kiln_node

ACTIVATION_SCALES_KEY = "kiln.activation_scales"  # model metadata: {value name: ActivationScale}
WEIGHT_SCALES_KEY = "kiln.weight_scales"  # model metadata: {constant name: {"scale", "axis"}}
QUANTIZED_OPS = ("QuantizedConv", "QuantizedMatMul")
# QuantizedMatMul's inputs after (x, w_q, w_scale, bias, residual), as _swap lays them out
X_SMOOTHING_INPUT = 5  # x_inverse_smooth
X_ROW_SCALE_INPUT = 6  # x_row_scale, given by a norm (kiln.passes.quantized_norm)

_T = ir.DataType
# policy -> the type activations and weights are quantized to, and its largest magnitude
FORMATS = {fmt: (quant_type, FORMAT_MAX[fmt])
           for fmt, quant_type in (("int8", _T.INT8), ("fp8", _T.FLOAT8E4M3FN))}
_FORMAT_OF_TYPE = {_T.INT8: "int8", _T.UINT8: "int8", _T.FLOAT8E4M3FN: "fp8"}
_QUANTIZED_RANGES = {_T.INT8: (-128, 127), _T.UINT8: (0, 255), _T.FLOAT8E4M3FN: (-448, 448)}

# Under calibration, convolutions over fewer input channels stay in float: an image network's first
# layer (3 channels) fills no 8-bit MMA step per tap, and is the most sensitive to quantization.
# ResNet-50's stem at batch 64 on an H100: 0.53 ms as an int8 implicit GEMM, 0.15 ms in fp16.
MIN_CALIBRATED_CHANNELS = 8
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: activations and weights share the range
_SMOOTH_LIMITS = (1e-5, 1e5)


@dataclass
class Calibrated:
    """What calibration measured: per-tensor ranges (clipping abs-max after the calibration
    method) and per-channel abs-maxima over the last axis."""

    ranges: dict[str, float]
    channels: dict[str, np.ndarray]


# (model, activations whose range to measure, activations whose channel maxima to measure)
Calibrate = Callable[[ir.Model, list[str], list[str]], Calibrated]


@dataclass(frozen=True)
class ActivationScale:
    """How one activation is quantized: ``q = saturate(round(x / scale) + zero_point)``."""

    scale: float
    zero_point: int
    type: ir.DataType

    @property
    def format(self) -> str:
        return _FORMAT_OF_TYPE[self.type]

    def bounds(self) -> tuple[float, float]:
        """The float range the quantization saturates to."""
        low, high = _QUANTIZED_RANGES[self.type]
        return (low - self.zero_point) * self.scale, (high - self.zero_point) * self.scale

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "type": self.type.name}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ActivationScale:
        return cls(float(data["scale"]), int(data["zero_point"]), _T[data["type"]])

    @classmethod
    def from_amax(cls, amax: float, fmt: str) -> ActivationScale:
        """The symmetric scale that maps ``[-amax, amax]`` onto the format's range."""
        return cls(scale_for(amax, fmt), 0, FORMATS[fmt][0])


def activation_scales(model: ir.Model) -> dict[str, ActivationScale]:
    """The activation scales recorded in ``model`` (by :class:`ReadQuantization`)."""
    recorded = json.loads(model.metadata_props.get(ACTIVATION_SCALES_KEY, "{}"))
    return {name: ActivationScale.from_json(entry) for name, entry in recorded.items()}


# --- explicit quantization -----------------------------------------------------------------------

class ReadQuantization(GraphPass):
    """Remove the model's Q -> DQ pairs and constant DQs, recording their scales (see above)."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        changes: Counter = Counter()
        scales = {name: entry.to_json() for name, entry in activation_scales(model).items()}
        weights = json.loads(model.metadata_props.get(WEIGHT_SCALES_KEY, "{}"))
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain != "":
                continue
            output = node.outputs[0]
            if output.is_graph_output() or node.attributes.get_int("block_size", 0):
                continue  # keeps its name / blocked scales: left to the DequantizeLinear op
            if constant(node.inputs[0]) is not None:
                if self._fold_constant(graph, node, weights):
                    changes["ConstantDequantized"] += 1
            elif self._remove_pair(model, node, scales):
                changes["ActivationPairRemoved"] += 1
        if scales:
            model.metadata_props[ACTIVATION_SCALES_KEY] = json.dumps(scales)
        if weights:
            model.metadata_props[WEIGHT_SCALES_KEY] = json.dumps(weights)
        return PassOutcome(model, +changes)

    @staticmethod
    def _fold_constant(graph: ir.Graph, dq: ir.Node, weights: dict[str, Any]) -> bool:
        quantized = constant(dq.inputs[0])
        scale = constant(_input(dq, 1))
        zero_point = constant(_input(dq, 2))
        if quantized is None or scale is None or (_input(dq, 2) is not None and zero_point is None):
            return False
        axis = dq.attributes.get_int("axis", 1) % max(quantized.ndim, 1)
        shape = [1] * quantized.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        wide = quantized.astype(np.float64)
        if zero_point is not None:
            wide = wide - zero_point.astype(np.float64).reshape(shape if zero_point.size > 1 else ())
        values = (wide * scale.astype(np.float64).reshape(shape if scale.size > 1 else ()))
        folded = initializer(graph, dq.outputs[0].name or "dequantized", values.astype(scale.dtype))
        symmetric = zero_point is None or not zero_point.astype(np.float64).any()
        if symmetric and quantized.dtype in (np.int8, ml_dtypes.float8_e4m3fn):
            weights[folded.name] = {"scale": scale.astype(np.float64).ravel().tolist(), "axis": axis}
        ir.convenience.replace_all_uses_with(dq.outputs[0], folded)
        graph.remove(dq, safe=True)
        return True

    @staticmethod
    def _remove_pair(model: ir.Model, dq: ir.Node, scales: dict[str, Any]) -> bool:
        """Q -> DQ becomes the Clip to the quantized range it implies (quantizers drop a ReLU
        whose output range starts at 0: the saturation does its work), its scale recorded."""
        graph = model.graph
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is None or q.op_type != "QuantizeLinear" or q.domain != "":
            return False
        entry = _pair_scale(q, dq)
        x = q.inputs[0]
        if entry is None or x is None or x.dtype != _T.FLOAT or model.opset_imports.get("", 0) < 11:
            return False
        low, high = entry.bounds()
        clip = ir.Node("", "Clip", [
            x, initializer(graph, f"{dq.name}_low", np.array(low, np.float32)),
            initializer(graph, f"{dq.name}_high", np.array(high, np.float32)),
        ], name=dq.name)
        clipped = clip.outputs[0]
        clipped.name, dq.outputs[0].name = dq.outputs[0].name, None
        clipped.type, clipped.shape = ir.TensorType(_T.FLOAT), x.shape
        graph.insert_before(dq, clip)
        ir.convenience.replace_all_uses_with(dq.outputs[0], clipped)
        graph.remove(dq, safe=True)
        if not q.outputs[0].uses() and not q.outputs[0].is_graph_output():
            graph.remove(q, safe=True)
        scales[clipped.name] = entry.to_json()
        return True


def _pair_scale(q: ir.Node, dq: ir.Node) -> ActivationScale | None:
    """The per-tensor scale a Q -> DQ pair applies, when both agree and kiln's kernels take it."""
    q_scale, dq_scale = constant(_input(q, 1)), constant(_input(dq, 1))
    if q_scale is None or dq_scale is None or q_scale.size != 1 or dq_scale.size != 1:
        return None
    if not np.isclose(float(q_scale.ravel()[0]), float(dq_scale.ravel()[0]), rtol=1e-6, atol=0):
        return None
    q_zero, dq_zero = _zero_point(q), _zero_point(dq)
    quant_type = _quantized_type(q)
    if q_zero is None or q_zero != dq_zero or quant_type not in _FORMAT_OF_TYPE:
        return None
    if q.attributes.get_int("saturate", 1) == 0:
        return None
    return ActivationScale(float(dq_scale.ravel()[0]), q_zero, quant_type)


def _quantized_type(q: ir.Node) -> ir.DataType | None:
    """What QuantizeLinear makes: its ``output_dtype``, else its zero point's type, else uint8."""
    output_dtype = q.attributes.get_int("output_dtype", 0)
    if output_dtype:
        return _T(output_dtype)
    zero_point = _input(q, 2)
    if zero_point is None:
        return _T.UINT8
    return zero_point.dtype


def _zero_point(node: ir.Node) -> int | None:
    value = _input(node, 2)
    if value is None:
        return 0
    array = constant(value)
    if array is None or array.size != 1:
        return None
    return int(np.asarray(array, dtype=np.float64).ravel()[0])


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


# --- quantizing layers ---------------------------------------------------------------------------

@dataclass
class _Layer:
    """A quantizable layer: its activation, its weight as the kernel reads it, its epilogue."""

    node: ir.Node
    op_type: str  # QuantizedConv | QuantizedMatMul
    x: ir.Value
    weight: np.ndarray  # conv [O, I/g, ...]; matmul [K, N]
    channel_axis: int  # of ``weight``: the output channels
    explicit_axis: int | None  # the output-channel axis of the model's weight, for its scales
    weight_name: str
    bias: ir.Value | np.ndarray | None
    residual: ir.Value | None
    attributes: dict[str, Any]


def quantizable_layer(node: ir.Node) -> _Layer | None:
    """``node`` as a layer :class:`QuantizeLayers` can quantize, else None."""
    if node.domain == "" and node.op_type == "Conv" or (
        node.domain == KILN_DOMAIN and node.op_type == "FusedConv"
    ):
        return _conv_layer(node)
    if node.domain == "" and node.op_type in ("MatMul", "Gemm") or (
        node.domain == KILN_DOMAIN and node.op_type == "FusedMatMul"
    ):
        return _matmul_layer(node)
    return None


def _conv_layer(node: ir.Node) -> _Layer | None:
    x, w = node.inputs[0], node.inputs[1]
    weight = constant(w)
    if x is None or x.dtype != _T.FLOAT or weight is None or weight.dtype != np.float32:
        return None
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    return _Layer(node, "QuantizedConv", x, weight, 0, 0, w.name or "", _input(node, 2),
                  _input(node, 3), attributes)


def _matmul_layer(node: ir.Node) -> _Layer | None:
    if node.op_type == "MatMul":
        product = FusedProduct(node.inputs[0], node.inputs[1])
    elif node.op_type == "Gemm":
        attrs = node.attributes
        product = FusedProduct(
            node.inputs[0], node.inputs[1], _input(node, 2),
            trans_a=attrs.get_int("transA", 0), trans_b=attrs.get_int("transB", 0),
            alpha=attrs.get_float("alpha", 1.0), beta=attrs.get_float("beta", 1.0),
        )
    else:
        product = FusedProduct.of(node)
    weight = constant(product.b)
    x = product.a
    if (x is None or x.dtype != _T.FLOAT or product.trans_a or weight is None
            or weight.dtype != np.float32 or weight.ndim != 2):
        return None
    if x.shape is not None and x.shape.rank() < 2 and node.op_type == "MatMul":
        return None  # a vector times a matrix drops an axis the kernels keep
    matrix = weight.T if product.trans_b else weight
    columns = matrix.shape[1]
    bias: ir.Value | np.ndarray | None = None
    if product.bias is not None:
        array = constant(product.bias)
        if array is None or array.size != columns or array.ndim > 2:
            return None  # the kernels add one bias per output column
        bias = (array.reshape(columns) * product.beta).astype(np.float32)
    attributes = {
        "activation": product.activation,
        "activation_params": product.activation_params or None,
        "residual_after_activation": product.residual_after_activation,
    }
    return _Layer(node, "QuantizedMatMul", x, (matrix * product.alpha).astype(np.float32), 1,
                  0 if product.trans_b else 1, product.b.name or "", bias, product.residual,
                  attributes)


def calibration_targets(model: ir.Model, pinned: Set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """The activations :class:`QuantizeLayers` needs measured, in graph order: those whose range
    a convolution's static scale comes from, and those whose channel maxima a matrix product's
    smoothing comes from (its scales are dynamic, per row). Layers pinned to a higher precision
    and activations the model gives scales for need nothing."""
    known = activation_scales(model)
    ranges: dict[str, None] = {}
    channels: dict[str, None] = {}
    for node in model.graph:
        if node.name in pinned:
            continue
        layer = quantizable_layer(node)
        if layer is None or not layer.x.name or layer.x.name in known or not _worth_calibrating(layer):
            continue
        (channels if layer.op_type == "QuantizedMatMul" else ranges)[layer.x.name] = None
    return list(ranges), list(channels)


class QuantizeLayers(GraphPass):
    """Quantize every layer whose activation has a scale (see the module's docstring).

    Under ``fmt`` ("int8" or "fp8") the layers the model gives no scale for are quantized too,
    with ranges ``calibrate`` measures (abs-max after the calibration method); without ``fmt``
    only the model's own scales apply. ``pinned`` layers stay as they are. Layers left in float
    are marked fp32 (:class:`ReducePrecision`, when it follows, narrows them).
    """

    def __init__(self, fmt: str | None = None, calibrate: Calibrate | None = None,
                 pinned: Set[str] = frozenset()) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"QuantizeLayers: {fmt!r} is not a quantized format")
        self.fmt = fmt
        self.calibrate = calibrate
        self.pinned = set(pinned)

    def __call__(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        changes: Counter = Counter()
        scales = activation_scales(model)
        calibrated = self._calibrate(model)
        explicit = json.loads(model.metadata_props.get(WEIGHT_SCALES_KEY, "{}"))
        for node in list(graph):
            layer = None if node.name in self.pinned else quantizable_layer(node)
            name = layer.x.name if layer is not None else None
            if layer is not None and name in scales:
                kept = self._replace(graph, layer, scales[name], explicit.get(layer.weight_name))
                changes["ModelWeightScales"] += kept
            elif layer is not None and not _worth_calibrating(layer):
                node.metadata_props.setdefault(PRECISION_KEY, "fp32")
                continue
            elif layer is not None and name in calibrated.ranges:
                self._replace(graph, layer, ActivationScale.from_amax(calibrated.ranges[name], self.fmt))
            elif layer is not None and name in calibrated.channels:
                self._replace_dynamic(graph, layer, calibrated.channels[name])
                changes["Smoothed"] += 1
            else:
                if self.fmt is not None:
                    node.metadata_props.setdefault(PRECISION_KEY, "fp32")
                continue
            changes[layer.op_type] += 1
        if changes:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_OPSET)
        return PassOutcome(model, +changes)

    def _calibrate(self, model: ir.Model) -> Calibrated:
        if self.fmt is None:
            return Calibrated({}, {})
        ranges, channels = calibration_targets(model, self.pinned)
        if not ranges and not channels:
            return Calibrated({}, {})
        if self.calibrate is None:
            first = (ranges or channels)[0]
            raise ConfigError(
                f"precision {self.fmt} needs calibration data (calibration_data= in Python, "
                f"--calibration-data DIR on the command line) or a calibration cache: "
                f"{len(ranges) + len(channels)} layer input(s) have no scale in the model, the "
                f"first {first!r}"
            )
        return self.calibrate(model, ranges, channels)

    def _replace(self, graph: ir.Graph, layer: _Layer, scale: ActivationScale,
                 explicit: Mapping[str, Any] | None = None) -> bool:
        quantized, weight_scale, kept = _quantize_weight(layer.weight, layer, scale.format, explicit)
        attributes = {"x_scale": scale.scale, "x_zero_point": scale.zero_point,
                      "x_type": scale.type.value}
        _swap(graph, layer, scale.format, quantized, weight_scale, None, attributes)
        return kept

    def _replace_dynamic(self, graph: ir.Graph, layer: _Layer, channel_amax: np.ndarray) -> None:
        """A matrix product with per-row activation scales and SmoothQuant's smoothing."""
        assert self.fmt is not None
        weight = layer.weight  # [K, N]
        smooth = np.clip(
            np.maximum(channel_amax.astype(np.float64), 1e-12) ** SMOOTHING_ALPHA
            / np.maximum(np.abs(weight).max(axis=1).astype(np.float64), 1e-12) ** (1 - SMOOTHING_ALPHA),
            *_SMOOTH_LIMITS,
        )
        smoothed = (weight * smooth[:, None]).astype(np.float32)
        quantized, weight_scale, _ = _quantize_weight(smoothed, layer, self.fmt, None)
        quant_type, _ = FORMATS[self.fmt]
        attributes = {"x_type": quant_type.value, "dynamic": 1}
        _swap(graph, layer, self.fmt, quantized, weight_scale, (1.0 / smooth).astype(np.float32),
              attributes)


def _worth_calibrating(layer: _Layer) -> bool:
    if layer.op_type != "QuantizedConv":
        return True
    return layer.weight.shape[1] * layer.attributes.get("group", 1) >= MIN_CALIBRATED_CHANNELS


def _swap(graph: ir.Graph, layer: _Layer, fmt: str, quantized: np.ndarray, weight_scale: np.ndarray,
          inverse_smooth: np.ndarray | None, quantization: dict[str, Any]) -> None:
    """Replace ``layer``'s node by its quantized form."""
    node = layer.node
    stem = layer.weight_name or node.name
    bias = layer.bias
    if isinstance(bias, np.ndarray):
        bias = initializer(graph, f"{node.name}_bias", bias)
    inputs = [
        layer.x, initializer(graph, f"{stem}_{fmt}", quantized),
        initializer(graph, f"{stem}_scale", weight_scale), bias, layer.residual,
        None if inverse_smooth is None else initializer(graph, f"{stem}_inverse_smooth", inverse_smooth),
    ]
    while inputs[-1] is None:
        inputs.pop()
    replacement = kiln_node(layer.op_type, inputs, {**layer.attributes, **quantization}, node.name)
    replacement.metadata_props.update(node.metadata_props)
    replacement.metadata_props[PRECISION_KEY] = fmt
    old, new = node.outputs[0], replacement.outputs[0]
    new.name, old.name = old.name, None
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [old], [new])


def _quantize_weight(weight: np.ndarray, layer: _Layer, fmt: str, explicit: Mapping[str, Any] | None
                     ) -> tuple[np.ndarray, np.ndarray, bool]:
    """``weight`` quantized per output channel, its scales, and whether they are the model's."""
    axis = layer.channel_axis
    channels = weight.shape[axis]
    shape = [1] * weight.ndim
    shape[axis] = channels
    quant_type, largest = FORMATS[fmt]
    scale = _explicit_scale(weight, axis, layer.explicit_axis, explicit, largest, fmt)
    kept = scale is not None
    if scale is None:
        amax = np.abs(weight).max(axis=tuple(i for i in range(weight.ndim) if i != axis))
        scale = np.maximum(amax.astype(np.float64), AMAX_FLOOR) / largest
    scaled = weight.astype(np.float64) / scale.reshape(shape)
    if quant_type == _T.INT8:
        quantized = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    else:
        quantized = np.clip(scaled, -largest, largest).astype(ml_dtypes.float8_e4m3fn)
    return quantized, scale.astype(np.float32), kept


def _explicit_scale(weight: np.ndarray, axis: int, model_axis: int | None,
                    explicit: Mapping[str, Any] | None, largest: float, fmt: str) -> np.ndarray | None:
    """The model's scales for ``weight``, per output channel, if they still describe it."""
    if explicit is None:
        return None
    given = np.asarray(explicit["scale"], dtype=np.float64)
    channels = weight.shape[axis]
    if given.size == 1:
        scale = np.full(channels, float(given[0]))
    elif given.size == channels and explicit["axis"] == model_axis:
        scale = given
    else:
        return None
    shape = [1] * weight.ndim
    shape[axis] = channels
    scaled = weight.astype(np.float64) / scale.reshape(shape)
    if np.abs(scaled).max(initial=0.0) > largest * (1 + 1e-6):
        return None
    if fmt == "int8" and not np.allclose(scaled, np.rint(scaled), atol=1e-3):
        return None  # a fusion changed the weight since the model quantized it
    return scale
