"""Matrix products with their epilogues, fused into ``kiln::FusedMatMul``.

Gemm becomes a FusedMatMul as it is. A MatMul by a constant weight (a transformer's linear layer;
Q @ K^T in attention has no constant operand and is left alone) grows one epilogue stage per rule:
a bias Add, a residual Add (before or after the activation) and an activation. The rules run in
that order, each to its fixpoint, and each extends a MatMul or an already fused product, so
``act(x @ W + b) + r`` and ``act(x @ W + b + r)`` both end as one node. An activation also joins
a product across the Reshape between them (GPT-2's Conv1D: a 2-D Gemm over the flattened tokens,
reshaped back to 3-D before its GELU): an elementwise activation commutes with a reshape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from kiln.passes.rewrite import (
    ACTIVATION_OPS,
    KILN_DOMAIN,
    Match,
    RewritePass,
    RewriteRule,
    activation_of,
    constant,
    is_float,
    kiln_node,
    producer,
    same_shape,
)

FUSED = "FusedMatMul"


@dataclass
class FusedProduct:
    """The operands and attributes of a ``kiln::FusedMatMul`` (see ``kiln.ops.fused_matmul``)."""

    a: ir.Value
    b: ir.Value
    bias: ir.Value | None = None
    residual: ir.Value | None = None
    trans_a: int = 0
    trans_b: int = 0
    alpha: float = 1.0
    beta: float = 1.0
    activation: str = ""
    activation_params: list[float] = field(default_factory=list)
    residual_after_activation: int = 0

    @property
    def is_bare(self) -> bool:
        return self.bias is None and self.residual is None and not self.activation

    @classmethod
    def of(cls, node: ir.Node) -> FusedProduct:
        a, b, bias, residual = [*node.inputs, None, None][:4]
        attrs = node.attributes
        return cls(
            a, b, bias, residual,
            trans_a=attrs.get_int("trans_a", 0),
            trans_b=attrs.get_int("trans_b", 0),
            alpha=attrs.get_float("alpha", 1.0),
            beta=attrs.get_float("beta", 1.0),
            activation=attrs.get_string("activation", ""),
            activation_params=list(attrs.get_floats("activation_params", [])),
            residual_after_activation=attrs.get_int("residual_after_activation", 0),
        )

    def node(self, name: str) -> ir.Node:
        inputs = [self.a, self.b, self.bias, self.residual]
        while inputs[-1] is None:
            inputs.pop()
        attributes = {
            "trans_a": self.trans_a,
            "trans_b": self.trans_b,
            "alpha": self.alpha,
            "beta": self.beta,
            "activation": self.activation,
            "activation_params": self.activation_params or None,
            "residual_after_activation": self.residual_after_activation,
        }
        return kiln_node(FUSED, inputs, attributes, name)


def _weight_matmul(node: ir.Node) -> tuple[FusedProduct, list[ir.Node]] | str:
    """A MatMul whose B is a constant matrix, or the transpose of one (torch's exported Linear)."""
    a, b = node.inputs
    transpose = producer(b, "Transpose")
    if transpose is not None and list(transpose.attributes.get_ints("perm", [1, 0])) == [1, 0]:
        weight, trans_b, nodes = transpose.inputs[0], 1, [node, transpose]
    else:
        weight, trans_b, nodes = b, 0, [node]
    array = constant(weight)
    if array is None:
        return f"{node.name}: B is not a constant weight (products of two activations stay MatMuls)"
    if array.ndim != 2 or not is_float(weight):
        return f"{node.name}: the weight is not a floating-point matrix"
    return FusedProduct(a, weight, trans_b=trans_b), nodes


def _product(value: ir.Value) -> tuple[FusedProduct, list[ir.Node]] | str:
    """The product that makes ``value`` and the nodes it consists of."""
    fused = producer(value, FUSED, KILN_DOMAIN)
    if fused is not None:
        return FusedProduct.of(fused), [fused]
    matmul = producer(value, "MatMul")
    if matmul is not None:
        return _weight_matmul(matmul)
    return f"{value.name} is not made by a MatMul or FusedMatMul"


def _output_columns(product: FusedProduct, output: ir.Value) -> int | None:
    """N, the size of the product's last axis, when known."""
    if output.shape is not None and isinstance(output.shape[-1], int):
        return output.shape[-1]
    if product.b.shape is not None and product.b.shape.rank() == 2:
        columns = product.b.shape[0 if product.trans_b else 1]
        return columns if isinstance(columns, int) else None
    return None


# --- rules ---------------------------------------------------------------------------------------

class _ProductRule(RewriteRule):
    """A rule whose match binds the ``product`` that replaces the matched nodes."""

    def rewrite(self, match: Match) -> list[ir.Node]:
        return [match.bindings["product"].node(match.nodes[0].name)]


def _either_order(node: ir.Node, match_operands) -> Match | str:
    """``match_operands(node, p, q)`` for the two operands of ``node``, in both orders."""
    reasons = []
    for p, q in (node.inputs, node.inputs[::-1]):
        found = match_operands(node, p, q)
        if isinstance(found, Match):
            return found
        reasons.append(found)
    return "; ".join(reasons)


class GemmToFusedMatMul(_ProductRule):
    """Gemm(A, B, C) -> FusedMatMul with Gemm's transposes and alpha, beta."""

    anchor = "Gemm"

    def match(self, node: ir.Node) -> Match | str:
        a, b, c = [*node.inputs, None][:3]
        if not (is_float(a) or is_float(b)):
            return f"{node.name}: not a floating-point Gemm"
        attrs = node.attributes
        beta = attrs.get_float("beta", 1.0)
        product = FusedProduct(
            a, b, c if beta != 0.0 else None,  # beta * C is zero (kiln's Gemm skips it too)
            trans_a=attrs.get_int("transA", 0), trans_b=attrs.get_int("transB", 0),
            alpha=attrs.get_float("alpha", 1.0), beta=beta,
        )
        return Match([node], [node.outputs[0]], {"product": product})


class FuseMatMulBias(_ProductRule):
    """Add(product, bias) with a constant bias along the last axis -> FusedMatMul(A, B, bias)."""

    anchor = "Add"

    def match(self, node: ir.Node) -> Match | str:
        return _either_order(node, self._match)

    def _match(self, node: ir.Node, x: ir.Value, bias: ir.Value) -> Match | str:
        found = _product(x)
        if isinstance(found, str):
            return found
        product, nodes = found
        if not product.is_bare:
            return f"{x.name} already has an epilogue"
        array = constant(bias)
        if array is None:
            return f"{bias.name} is not a constant"
        columns = _output_columns(product, x)
        if array.ndim > 0 and array.shape[-1] not in (1, columns):
            return f"{bias.name} of shape {array.shape} does not run along the last axis"
        if any(d != 1 for d in array.shape[:-1]):
            return f"{bias.name} of shape {array.shape} varies along other axes than the last"
        rank = x.shape.rank() if x.shape is not None else None
        if array.ndim > 1 and (rank is None or array.ndim > rank):
            return f"{bias.name} of shape {array.shape} may broadcast the product to more axes"
        product.bias, product.beta = bias, 1.0
        return Match([*nodes, node], [node.outputs[0]], {"product": product})


class FuseMatMulResidual(_ProductRule):
    """Add(product, r) or Add(act(product), r) with r of the same shape -> FusedMatMul(..., r)."""

    anchor = "Add"

    def match(self, node: ir.Node) -> Match | str:
        return _either_order(node, self._match)

    def _match(self, node: ir.Node, x: ir.Value, residual: ir.Value) -> Match | str:
        if not same_shape(x, residual):
            return f"{residual.name} is not known to have the shape of {x.name}"
        found = self._product_through_activation(x)
        if isinstance(found, str):
            return found
        product, nodes = found
        if product.residual is not None:
            return f"{x.name} already adds a residual"
        if residual.producer() in nodes:
            return f"{residual.name} is computed inside the product"
        product.residual = residual
        product.residual_after_activation = int(bool(product.activation))
        return Match([*nodes, node], [node.outputs[0]], {"product": product})

    @staticmethod
    def _product_through_activation(x: ir.Value) -> tuple[FusedProduct, list[ir.Node]] | str:
        """The product making ``x``, with the activation between them when there is one."""
        act = x.producer()
        found = activation_of(act) if act is not None else "an input"
        if isinstance(found, str):
            return _product(x)
        inner = _product(act.inputs[0])
        if isinstance(inner, str):
            return inner
        product, nodes = inner
        if product.activation or product.residual is not None:
            return f"{act.inputs[0].name} already has an activation or residual"
        product.activation, product.activation_params = found
        return product, [*nodes, act]


def _activated(node: ir.Node, value: ir.Value) -> tuple[FusedProduct, list[ir.Node]] | str:
    """The product making ``value`` with ``node``'s activation added, or why it takes none."""
    activation = activation_of(node)
    if isinstance(activation, str):
        return activation
    found = _product(value)
    if isinstance(found, str):
        return found
    product, nodes = found
    if product.activation:
        return f"{value.name} already ends in an activation"
    product.activation, product.activation_params = activation
    return product, nodes


class _ActivationRule(_ProductRule):
    """A rule anchored at one activation op type; one instance per type."""

    def __init__(self, domain: str, op_type: str) -> None:
        self.anchor_domain, self.anchor = domain, op_type


class FuseMatMulActivation(_ActivationRule):
    """act(product) -> FusedMatMul(..., activation)."""

    def match(self, node: ir.Node) -> Match | str:
        found = _activated(node, node.inputs[0])
        if isinstance(found, str):
            return found
        product, nodes = found
        return Match([*nodes, node], [node.outputs[0]], {"product": product})


class FuseMatMulActivationThroughReshape(_ActivationRule):
    """act(Reshape(product)) -> Reshape(FusedMatMul(..., activation))."""

    def match(self, node: ir.Node) -> Match | str:
        reshape = producer(node.inputs[0], "Reshape")
        if reshape is None:
            return f"{node.inputs[0].name} is not made by a Reshape"
        found = _activated(node, reshape.inputs[0])
        if isinstance(found, str):
            return found
        product, nodes = found
        return Match([*nodes, reshape, node], [node.outputs[0]], {"product": product, "reshape": reshape})

    def rewrite(self, match: Match) -> list[ir.Node]:
        reshape = match.bindings["reshape"]
        fused = match.bindings["product"].node(match.nodes[0].name)
        flat = fused.outputs[0]
        flat.name = f"{reshape.inputs[0].name}_activated"
        flat.type, flat.shape = reshape.inputs[0].type, reshape.inputs[0].shape
        reshaped = ir.Node(
            "", "Reshape", [flat, reshape.inputs[1]], list(reshape.attributes.values()),
            name=reshape.name,
        )
        return [fused, reshaped]


def fuse_matmul() -> RewritePass:
    # The residual rule runs before the activation rules: it absorbs act(product) + r itself, and
    # leaves act(product + r) whole for them.
    return RewritePass(
        GemmToFusedMatMul(),
        FuseMatMulBias(),
        FuseMatMulResidual(),
        *(FuseMatMulActivation(domain, op) for domain, op in ACTIVATION_OPS),
        *(FuseMatMulActivationThroughReshape(domain, op) for domain, op in ACTIVATION_OPS),
        name="FuseMatMul",
    )
