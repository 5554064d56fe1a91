"""Fuse a convolution with its epilogue (bias, activation, residual addition) into ``kiln::FusedConv``.

Each rule absorbs one node into the convolution that feeds it, anchored at that node: a bias Add
into Conv's bias, a residual Add, an activation. Exporters write the epilogue in several orders
(ResNet: relu(conv + shortcut); others: conv, activation, then the addition), so the pass runs
the rules in the order that turns every such chain into one node: bias, residual, activation,
then residual again for an addition after the activation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.passes.rewrite import (
    KILN_DOMAIN,
    activation_of,
    Match,
    RewritePass,
    RewriteRule,
    constant,
    initializer,
    is_self_contained,
    kiln_node,
    producer,
)

def _convolution(value: ir.Value) -> ir.Node | None:
    """The Conv or FusedConv making ``value``, else None."""
    return producer(value, "Conv") or producer(value, "FusedConv", KILN_DOMAIN)


def _attributes(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _fused_conv(conv: ir.Node, residual: ir.Value | None, **epilogue: Any) -> ir.Node:
    """``conv`` (a Conv or FusedConv) as a FusedConv, with ``residual`` and ``epilogue`` added."""
    inputs = list(conv.inputs)
    if residual is not None:
        inputs = [*inputs, None, None][:3] + [residual]
    return kiln_node("FusedConv", inputs, {**_attributes(conv), **epilogue}, name=conv.name)


def _per_channel(array: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``array`` as a vector over the channels when it broadcasts against an (N, C, ...) tensor of
    ``rank`` dimensions along C only, else None."""
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(array.reshape(shape[1]), (channels,))


def _may_differ(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """True when the shapes are known to differ, one broadcasting against the other."""
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        x, y = (d if isinstance(d, int) else None for d in (x, y))
        if x is not None and y is not None and x != y:
            return True
        if (x == 1) != (y == 1) and None in (x, y):  # a 1 against an unknown size broadcasts
            return True
    return False


class FoldBiasAddIntoConv(RewriteRule):
    """Conv(X, W, B?) + c, either operand order, c constant per output channel (shaped [C, 1, 1],
    [1, C, 1, 1] or one number) -> Conv(X, W, B + c)."""

    anchor = "Add"

    def match(self, node: ir.Node) -> Match | str:
        for conv_output, addend in (node.inputs, reversed(node.inputs)):
            conv = producer(conv_output, "Conv")
            bias = constant(addend)
            if conv is None or bias is None:
                continue
            weight = conv.inputs[1]
            if weight.shape is None or not isinstance(weight.shape[0], int):
                return "the convolution's weight shape is unknown"
            channels = weight.shape[0]
            per_channel = _per_channel(bias, len(weight.shape), channels)
            if per_channel is None:
                return f"{addend.name} of shape {bias.shape} is not one number per channel"
            has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
            old = constant(conv.inputs[2]) if has_bias else np.zeros(channels)
            if old is None:
                return "the convolution's bias is not constant"
            return Match([conv, node], [node.outputs[0]], {"conv": conv, "bias": old + per_channel})
        return "not the sum of a Conv and a constant"

    def rewrite(self, match: Match) -> list[ir.Node]:
        conv = match.bindings["conv"]
        x, weight = conv.inputs[:2]
        dtype = weight.dtype.numpy() if weight.dtype is not None else np.float32
        bias = initializer(conv.graph, f"{conv.name}_bias", match.bindings["bias"].astype(dtype))
        return [ir.Node("", "Conv", [x, weight, bias], conv.attributes.values(), name=conv.name)]


class FuseConvResidual(RewriteRule):
    """Conv(...) + R or R + Conv(...), R of the convolution's shape -> FusedConv(..., R).

    The convolution may be a FusedConv without a residual; when it has an activation, the
    residual is added after it.
    """

    anchor = "Add"

    def match(self, node: ir.Node) -> Match | str:
        reason = "no operand is a convolution without a residual"
        for conv_output, residual in (node.inputs, reversed(node.inputs)):
            conv = _convolution(conv_output)
            if conv is None or (len(conv.inputs) > 3 and conv.inputs[3] is not None):
                continue
            if residual is conv_output:
                return "the residual is the convolution itself"
            if _may_differ(conv_output.shape, residual.shape):
                reason = f"{residual.name} {residual.shape} broadcasts against {conv_output.shape}"
                continue
            found = Match([conv, node], [node.outputs[0]], {"conv": conv, "residual": residual})
            if is_self_contained(found):
                return found
            reason = f"{conv_output.name} is read elsewhere"
        return reason

    def rewrite(self, match: Match) -> list[ir.Node]:
        conv = match.bindings["conv"]
        after = 1 if conv.attributes.get_string("activation", "") else 0
        return [_fused_conv(conv, match.bindings["residual"], residual_after_activation=after)]


class FuseConvActivation(RewriteRule):
    """Conv or FusedConv (without an activation) followed by an activation -> FusedConv with it.

    One instance per anchor: the ONNX activations of :data:`ACTIVATIONS` and ``kiln::Activation``.
    """

    def __init__(self, anchor: str, domain: str = "") -> None:
        self.anchor, self.anchor_domain = anchor, domain

    def match(self, node: ir.Node) -> Match | str:
        activation = activation_of(node)
        if isinstance(activation, str):
            return activation
        conv = _convolution(node.inputs[0])
        if conv is None:
            return "the input is not a convolution"
        if conv.attributes.get_string("activation", ""):
            return "the convolution already ends in an activation"
        name, params = activation
        bindings = {"conv": conv, "activation": name, "params": params}
        return Match([conv, node], [node.outputs[0]], bindings)

    def rewrite(self, match: Match) -> list[ir.Node]:
        params = match.bindings["params"] or None
        return [_fused_conv(match.bindings["conv"], None, activation=match.bindings["activation"],
                            activation_params=params)]


def fuse_conv() -> RewritePass:
    """Conv + bias + activation + residual, in any order exporters write them, as FusedConv."""
    onnx_activations = ("Relu", "LeakyRelu", "Elu", "Clip", "Sigmoid", "HardSigmoid", "Tanh")
    activations = [FuseConvActivation(op) for op in onnx_activations]
    return RewritePass(
        FoldBiasAddIntoConv(),
        FuseConvResidual(),
        *activations,
        FuseConvActivation("Activation", KILN_DOMAIN),
        FuseConvResidual(),
        name="FuseConv",
    )
