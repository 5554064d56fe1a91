"""Fold an inference BatchNormalization into the layer before it.

In inference BatchNormalization is ``y = x * s + t`` per channel (axis 1), with
``s = scale / sqrt(var + epsilon)`` and ``t = bias - mean * s``. When x comes from a Conv,
ConvTranspose, Gemm or MatMul with constant weights, and only the BatchNormalization reads it,
scaling that layer's weights by ``s`` along its output channels and its bias to ``b * s + t``
gives the same result with one node fewer.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.passes.rewrite import Match, RewritePass, RewriteRule, constant, initializer, producer


@dataclass
class _Affine:
    """The per-channel ``x * scale + shift`` an inference BatchNormalization computes."""

    scale: np.ndarray
    shift: np.ndarray


def _batchnorm_affine(node: ir.Node) -> _Affine | str:
    """The BatchNormalization's affine map, or why it is not a constant one."""
    if node.attributes.get_int("training_mode", 0) or len(node.outputs) != 1:
        return "BatchNormalization in training mode (or with its statistics as outputs)"
    if not node.attributes.get_int("spatial", 1):  # before opset 9: statistics per element
        return "BatchNormalization with spatial=0"
    arrays = [constant(v) for v in node.inputs[1:5]]
    if len(arrays) != 4 or any(a is None or a.ndim != 1 or a.size != arrays[0].size for a in arrays):
        return "BatchNormalization parameters are not constant vectors of one size"
    scale, bias, mean, var = (a.astype(np.float64) for a in arrays)
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    multiplier = scale / np.sqrt(var + epsilon)
    return _Affine(multiplier, bias - mean * multiplier)


class _FoldBatchNorm(RewriteRule):
    """BatchNormalization(layer(x)) -> layer'(x); subclasses know the layer."""

    anchor = "BatchNormalization"
    layer_ops: tuple[str, ...]

    def match(self, node: ir.Node) -> Match | str:
        affine = _batchnorm_affine(node)
        if isinstance(affine, str):
            return affine
        layer = producer(node.inputs[0], self.layer_ops)
        if layer is None:
            return f"the input is not made by {' or '.join(self.layer_ops)}"
        found = self.match_layer(layer, affine)
        if isinstance(found, str):
            return found
        found.nodes.append(node)
        found.outputs.append(node.outputs[0])
        return found

    @abstractmethod
    def match_layer(self, layer: ir.Node, affine: _Affine) -> Match | str:
        """The layer's nodes and the folded weights in bindings, or why it cannot fold."""


def _bias_or_zeros(value: ir.Value | None, channels: int) -> np.ndarray | None:
    """The constant bias ``value``, zeros when absent, None when it is not constant."""
    return np.zeros(channels) if value is None else constant(value)


def _new_inputs(layer: ir.Node, **arrays: np.ndarray) -> dict[str, ir.Value]:
    """Initializers for ``arrays`` in the weight's dtype, named after ``layer``."""
    dtype = constant(layer.inputs[1]).dtype
    return {
        key: initializer(layer.graph, f"{layer.name or 'layer'}_{key}", array.astype(dtype))
        for key, array in arrays.items()
    }


class FoldBatchNormIntoConv(_FoldBatchNorm):
    """BatchNormalization(Conv(X, W, B?)) -> Conv(X, W * s, B * s + t); W is [Cout, Cin/group, ...]."""

    layer_ops = ("Conv",)

    def match_layer(self, layer: ir.Node, affine: _Affine) -> Match | str:
        weight = constant(layer.inputs[1])
        if weight is None or weight.shape[0] != affine.scale.size:
            return "the weight is not constant or has other output channels"
        bias = _bias_or_zeros(layer.inputs[2] if len(layer.inputs) > 2 else None, weight.shape[0])
        if bias is None:
            return "the bias is not constant"
        per_output = affine.scale.reshape(-1, *[1] * (weight.ndim - 1))
        return Match([layer], [], {"layer": layer, "weight": weight * per_output,
                                   "bias": bias * affine.scale + affine.shift})

    def rewrite(self, match: Match) -> list[ir.Node]:
        layer = match.bindings["layer"]
        new = _new_inputs(layer, weight=match.bindings["weight"], bias=match.bindings["bias"])
        inputs = [layer.inputs[0], new["weight"], new["bias"]]
        return [ir.Node("", layer.op_type, inputs, layer.attributes.values(), name=layer.name)]


class FoldBatchNormIntoConvTranspose(FoldBatchNormIntoConv):
    """BatchNormalization(ConvTranspose(X, W, B?)) -> ConvTranspose(X, W * s, B * s + t).

    W is [Cin, Cout/group, ...]: output channel ``g * Cout/group + j`` is column j of group g's rows.
    """

    layer_ops = ("ConvTranspose",)

    def match_layer(self, layer: ir.Node, affine: _Affine) -> Match | str:
        weight = constant(layer.inputs[1])
        group = layer.attributes.get_int("group", 1)
        if weight is None or weight.shape[0] % group or weight.shape[1] * group != affine.scale.size:
            return "the weight is not constant or has other output channels"
        bias = _bias_or_zeros(layer.inputs[2] if len(layer.inputs) > 2 else None, affine.scale.size)
        if bias is None:
            return "the bias is not constant"
        grouped = weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])
        per_output = affine.scale.reshape(group, 1, weight.shape[1], *[1] * (weight.ndim - 2))
        folded = (grouped * per_output).reshape(weight.shape)
        return Match([layer], [], {"layer": layer, "weight": folded,
                                   "bias": bias * affine.scale + affine.shift})


class FoldBatchNormIntoGemm(_FoldBatchNorm):
    """BatchNormalization(Gemm(A, B, C?)) -> Gemm(A, B * s, beta * C * s + t) with beta 1.

    Gemm's output is [M, N], so BatchNormalization's channels are its N columns.
    """

    layer_ops = ("Gemm",)

    def match_layer(self, layer: ir.Node, affine: _Affine) -> Match | str:
        weight = constant(layer.inputs[1])
        trans_b = layer.attributes.get_int("transB", 0)
        if weight is None or weight.ndim != 2 or weight.shape[0 if trans_b else 1] != affine.scale.size:
            return "the weight is not constant or has other output channels"
        c = _bias_or_zeros(layer.inputs[2] if len(layer.inputs) > 2 else None, affine.scale.size)
        if c is None:
            return "C is not constant"
        per_output = affine.scale[:, None] if trans_b else affine.scale[None, :]
        beta = layer.attributes.get_float("beta", 1.0)
        return Match([layer], [], {"layer": layer, "weight": weight * per_output,
                                   "bias": beta * c * affine.scale + affine.shift})

    def rewrite(self, match: Match) -> list[ir.Node]:
        layer = match.bindings["layer"]
        new = _new_inputs(layer, weight=match.bindings["weight"], bias=match.bindings["bias"])
        attributes = [a for a in layer.attributes.values() if a.name != "beta"]
        inputs = [layer.inputs[0], new["weight"], new["bias"]]
        return [ir.Node("", "Gemm", inputs, attributes, name=layer.name)]


class FoldBatchNormIntoMatMul(_FoldBatchNorm):
    """BatchNormalization(MatMul(X, W) [+ b]) -> MatMul(X, W * s) + (b * s + t), X of rank 2.

    The bias Add may take its operands in either order. X must be [N, K]: on higher ranks
    BatchNormalization's channel axis (1) is not MatMul's output axis (the last).
    """

    layer_ops = ("MatMul", "Add")

    def match_layer(self, layer: ir.Node, affine: _Affine) -> Match | str:
        matmul, bias, nodes = self._matmul_and_bias(layer)
        if matmul is None:
            return "not a MatMul with an optional constant bias"
        output = matmul.outputs[0]
        if output.shape is None or len(output.shape) != 2:
            return "the MatMul's output is not known to be of rank 2"
        weight = constant(matmul.inputs[1])
        if weight is None or weight.ndim != 2 or weight.shape[1] != affine.scale.size:
            return "the weight is not a constant matrix with the BatchNormalization's channels"
        if bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, affine.scale.size)):
            return "the bias does not broadcast along the MatMul's columns"
        return Match(nodes, [], {"layer": matmul, "weight": weight * affine.scale[None, :],
                                 "bias": bias * affine.scale + affine.shift})

    @staticmethod
    def _matmul_and_bias(layer: ir.Node) -> tuple[ir.Node | None, np.ndarray | None, list[ir.Node]]:
        if layer.op_type == "MatMul":
            return layer, np.zeros(()), [layer]
        for product, addend in (layer.inputs, reversed(layer.inputs)):
            matmul, bias = producer(product, "MatMul"), constant(addend)
            if matmul is not None and bias is not None:
                return matmul, bias, [matmul, layer]
        return None, None, []

    def rewrite(self, match: Match) -> list[ir.Node]:
        matmul = match.bindings["layer"]
        new = _new_inputs(matmul, weight=match.bindings["weight"], bias=match.bindings["bias"])
        product = ir.Node("", "MatMul", [matmul.inputs[0], new["weight"]], name=matmul.name)
        bias = ir.Node("", "Add", [product.outputs[0], new["bias"]], name=f"{matmul.name}_bias")
        return [product, bias]


def fold_batchnorm() -> RewritePass:
    return RewritePass(
        FoldBatchNormIntoConv(),
        FoldBatchNormIntoConvTranspose(),
        FoldBatchNormIntoGemm(),
        FoldBatchNormIntoMatMul(),
        name="FoldBatchNorm",
    )
