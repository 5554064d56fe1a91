"""Recognise activations and replace each by one ``kiln::Activation`` node.

Exporters write GELU, SiLU, HardSwish and Mish as several elementwise nodes, in many operand
orders and associations, or as ONNX ops (``Gelu``, ``Swish``, ``HardSwish``, ``Mish``). Either way
they become ``kiln::Activation(x; activation=...)``, one vocabulary that epilogue fusions absorb.
Single ONNX activations (Relu, Sigmoid, Tanh, LeakyRelu, Clip, HardSigmoid) stay as they are:
epilogue rules take those directly.

The decomposed activations all have the form ``coefficient * x * gate(x)``: SiLU's gate is
``Sigmoid(x)``, GELU's ``1 + erf(x / sqrt(2))`` (coefficient 1/2), HardSwish's ``Relu6(x + 3)``
(1/6) or ``HardSigmoid(x)``, Mish's ``tanh(softplus(x))``. A rule finds the gate in the tree of
products that ends at its anchor, then checks that the whole tree is exactly that product.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from kiln.ops.activation import GELU_TANH_CUBIC, SQRT_2_OVER_PI
from kiln.passes.rewrite import (
    Match,
    RewritePass,
    RewriteRule,
    clip_bounds,
    constant,
    kiln_node,
    producer,
    scalar,
)

# Exporters round constants (1.4142 for sqrt(2)); closer than this counts as equal.
_RELATIVE_TOLERANCE = 1e-4
# How many Mul/Div nodes deep a product is followed; exporters' forms need at most 4.
_PRODUCT_DEPTH = 4


def _near(number: float | None, expected: float) -> bool:
    return number is not None and math.isclose(number, expected, rel_tol=_RELATIVE_TOLERANCE)


def _is(value: ir.Value, among: Sequence[ir.Value]) -> bool:
    return any(value is other for other in among)


@dataclass
class _Product:
    """A value as ``coefficient * factors[0] * factors[1] * ...`` and the nodes computing it."""

    factors: list[ir.Value]
    coefficient: float
    nodes: list[ir.Node]

    def equals(self, factors: Sequence[ir.Value], coefficient: float) -> bool:
        """True when the factors are ``factors`` in any order and the coefficient matches."""
        return sorted(map(id, self.factors)) == sorted(map(id, factors)) and _near(
            self.coefficient, coefficient
        )


def _product(value: ir.Value, factors: Sequence[ir.Value], depth: int = _PRODUCT_DEPTH) -> _Product:
    """``value`` as a product, looking through Mul, Div by a constant and Pow by 2 or 3.

    Values in ``factors`` are never looked into: they are the factors the caller expects (``x``
    may itself be a product computed elsewhere).
    """
    if _is(value, factors):
        return _Product([value], 1.0, [])
    number = scalar(value)
    if number is not None:
        return _Product([], number, [])
    node = value.producer()
    if depth == 0 or node is None or node.domain != "":
        return _Product([value], 1.0, [])
    if node.op_type == "Mul":
        left, right = (_product(v, factors, depth - 1) for v in node.inputs)
        return _Product(
            left.factors + right.factors,
            left.coefficient * right.coefficient,
            [*left.nodes, *right.nodes, node],
        )
    if node.op_type == "Div" and (divisor := scalar(node.inputs[1])):
        numerator = _product(node.inputs[0], factors, depth - 1)
        return _Product(numerator.factors, numerator.coefficient / divisor, [*numerator.nodes, node])
    if node.op_type == "Pow" and _is(node.inputs[0], factors):
        exponent = scalar(node.inputs[1])
        if exponent in (2.0, 3.0):
            return _Product([node.inputs[0]] * int(exponent), 1.0, [node])
    return _Product([value], 1.0, [])


def _product_tree(value: ir.Value, depth: int = _PRODUCT_DEPTH) -> Iterator[ir.Value]:
    """The values of the Mul/Div tree that ends in ``value``, nearest first."""
    frontier = [value]
    for _ in range(depth + 1):
        yield from frontier
        frontier = [
            operand
            for v in frontier
            if (node := producer(v, ("Mul", "Div"))) is not None
            for operand in node.inputs
        ]


def _scaled(value: ir.Value) -> tuple[ir.Value, float, ir.Node] | None:
    """``value`` as (x, c, node) when it is ``x * c``, ``c * x`` or ``x / c`` for a constant c."""
    node = producer(value, ("Mul", "Div"))
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Div":
        divisor = scalar(b)
        return (a, 1.0 / divisor, node) if divisor else None
    if scalar(b) is not None:
        return a, scalar(b), node
    if scalar(a) is not None:
        return b, scalar(a), node
    return None


def _plus(value: ir.Value, number: float) -> tuple[ir.Value, ir.Node] | None:
    """(y, node) when ``value`` is ``y + number`` or ``number + y``."""
    node = producer(value, "Add")
    if node is None:
        return None
    a, b = node.inputs
    if _near(scalar(b), number):
        return a, node
    if _near(scalar(a), number):
        return b, node
    return None


def _min_max_bound(value: ir.Value, op_type: str) -> tuple[ir.Value, float, ir.Node] | None:
    """(y, bound, node) when ``value`` is Min or Max (``op_type``) of y and a constant."""
    node = producer(value, op_type)
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if scalar(b) is not None:
        return a, scalar(b), node
    if scalar(a) is not None:
        return b, scalar(a), node
    return None


_RELU6_BY_MIN_MAX = (("Min", 6.0, "Max", 0.0), ("Max", 0.0, "Min", 6.0))


def _relu6(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """(y, nodes) when ``value`` is y clamped to [0, 6] (Clip, or Min and Max in either order)."""
    clip = producer(value, "Clip")
    if clip is not None:
        bounds = clip_bounds(clip)
        return (clip.inputs[0], [clip]) if bounds == (0.0, 6.0) else None
    for outer_op, outer_bound, inner_op, inner_bound in _RELU6_BY_MIN_MAX:
        outer = _min_max_bound(value, outer_op)
        if outer is None or outer[1] != outer_bound:
            continue
        inner = _min_max_bound(outer[0], inner_op)
        if inner is not None and inner[1] == inner_bound:
            return inner[0], [outer[2], inner[2]]
    return None


@dataclass
class _Gate:
    """``gate(x)``, found at some value: the x it reads, the coefficient its activation multiplies
    by, and the nodes computing it."""

    x: ir.Value
    coefficient: float
    nodes: list[ir.Node]


class _FuseGatedActivation(RewriteRule):
    """``coefficient * x * gate(x)`` -> ``kiln::Activation(x)``; subclasses recognise the gate.

    Anchored at the last Mul, or at a Div when the coefficient is written as a division.
    """

    activation: str

    def __init__(self, anchor: str = "Mul") -> None:
        self.anchor = anchor

    @abstractmethod
    def gate(self, value: ir.Value) -> _Gate | None:
        """The gate when ``value`` is one, else None."""

    def match(self, node: ir.Node) -> Match | str:
        output = node.outputs[0]
        for candidate in _product_tree(output):
            gate = self.gate(candidate)
            if gate is None:
                continue
            product = _product(output, [gate.x, candidate])
            if not product.equals([gate.x, candidate], gate.coefficient):
                continue
            nodes = list({id(n): n for n in [*product.nodes, *gate.nodes]}.values())
            if not _constants_broadcast_into(nodes, gate.x):
                return f"a constant has more dimensions than {gate.x.name}"
            return Match(nodes, [output], {"x": gate.x, "name": node.name})
        return f"not {self.activation} written as coefficient * x * gate(x)"

    def rewrite(self, match: Match) -> list[ir.Node]:
        return [
            kiln_node("Activation", [match.bindings["x"]], {"activation": self.activation},
                      name=match.bindings["name"])
        ]


def _constants_broadcast_into(nodes: Sequence[ir.Node], x: ir.Value) -> bool:
    """True when no constant operand of ``nodes`` has more dimensions than ``x`` (one that had
    would broadcast the output to more dimensions than the activation of x has)."""
    rank = len(x.shape) if x.shape is not None else 0
    for node in nodes:
        for value in node.inputs:
            array = constant(value)
            if array is not None and array.ndim > rank:
                return False
    return True


class FuseSilu(_FuseGatedActivation):
    """x * Sigmoid(x) -> Activation(Silu)."""

    activation = "Silu"

    def gate(self, value: ir.Value) -> _Gate | None:
        sigmoid = producer(value, "Sigmoid")
        return None if sigmoid is None else _Gate(sigmoid.inputs[0], 1.0, [sigmoid])


class FuseGeluErf(_FuseGatedActivation):
    """x * 0.5 * (1 + erf(x / sqrt(2))) -> Activation(Gelu); a Div by sqrt(2) or Mul by 1/sqrt(2)."""

    activation = "Gelu"

    def gate(self, value: ir.Value) -> _Gate | None:
        plus_one = _plus(value, 1.0)
        erf = producer(plus_one[0], "Erf") if plus_one else None
        scaled = _scaled(erf.inputs[0]) if erf else None
        if scaled is None or not _near(scaled[1], 1 / math.sqrt(2)):
            return None
        return _Gate(scaled[0], 0.5, [plus_one[1], erf, scaled[2]])


class FuseGeluTanh(_FuseGatedActivation):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> Activation(GeluTanh).

    x^3 as Pow(x, 3) or x * x * x; also the factored form sqrt(2/pi) * x * (1 + 0.044715 * x^2).
    """

    activation = "GeluTanh"

    def gate(self, value: ir.Value) -> _Gate | None:
        plus_one = _plus(value, 1.0)
        tanh = producer(plus_one[0], "Tanh") if plus_one else None
        if tanh is None:
            return None
        argument = self._cubic_sum(tanh.inputs[0]) or self._factored(tanh.inputs[0])
        if argument is None:
            return None
        x, nodes = argument
        return _Gate(x, 0.5, [plus_one[1], tanh, *nodes])

    @staticmethod
    def _cubic_sum(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
        """sqrt(2/pi) * (x + 0.044715 * x^3)."""
        scaled = _scaled(value)
        if scaled is None or not _near(scaled[1], SQRT_2_OVER_PI):
            return None
        add = producer(scaled[0], "Add")
        if add is None:
            return None
        for x, cubic in (add.inputs, reversed(add.inputs)):
            product = _product(cubic, [x])
            if product.equals([x, x, x], GELU_TANH_CUBIC):
                return x, [scaled[2], add, *product.nodes]
        return None

    @staticmethod
    def _factored(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
        """sqrt(2/pi) * x * (1 + 0.044715 * x^2)."""
        for one_plus in _product_tree(value):
            plus_one = _plus(one_plus, 1.0)
            if plus_one is None:
                continue
            for x in _product_tree(value):
                outer = _product(value, [x, one_plus])
                square = _product(plus_one[0], [x])
                if outer.equals([x, one_plus], SQRT_2_OVER_PI) and square.equals(
                    [x, x], GELU_TANH_CUBIC
                ):
                    return x, [*outer.nodes, plus_one[1], *square.nodes]
        return None


class FuseHardSwish(_FuseGatedActivation):
    """x * HardSigmoid(x; 1/6, 1/2), or x * Relu6(x + 3) / 6 with Relu6 as Clip(0, 6) or
    Min/Max -> Activation(HardSwish)."""

    activation = "HardSwish"

    def gate(self, value: ir.Value) -> _Gate | None:
        hard_sigmoid = producer(value, "HardSigmoid")
        if hard_sigmoid is not None:
            alpha = hard_sigmoid.attributes.get_float("alpha", 0.2)
            beta = hard_sigmoid.attributes.get_float("beta", 0.5)
            if _near(alpha, 1 / 6) and _near(beta, 0.5):
                return _Gate(hard_sigmoid.inputs[0], 1.0, [hard_sigmoid])
            return None
        relu6 = _relu6(value)
        plus_three = _plus(relu6[0], 3.0) if relu6 else None
        if plus_three is None:
            return None
        return _Gate(plus_three[0], 1 / 6, [*relu6[1], plus_three[1]])


class FuseMish(_FuseGatedActivation):
    """x * tanh(softplus(x)) -> Activation(Mish); see :func:`_softplus` for softplus' forms."""

    activation = "Mish"

    def gate(self, value: ir.Value) -> _Gate | None:
        tanh = producer(value, "Tanh")
        softplus = _softplus(tanh.inputs[0]) if tanh else None
        return None if softplus is None else _Gate(softplus[0], 1.0, [tanh, *softplus[1]])


# Above this, log(1 + exp(x)) rounds to x in float32, so torch's switch to x there changes nothing.
_SOFTPLUS_LINEAR_FROM = 15.0


def _softplus(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, nodes) when ``value`` is softplus(x): the ONNX op, log(1 + exp(x)), or torch's
    Where(x > threshold, x, softplus(x))."""
    softplus = producer(value, "Softplus")
    if softplus is not None:
        return softplus.inputs[0], [softplus]
    log = producer(value, "Log")
    plus_one = _plus(log.inputs[0], 1.0) if log else None
    exp = producer(plus_one[0], "Exp") if plus_one else None
    if exp is not None:
        return exp.inputs[0], [log, plus_one[1], exp]
    where = producer(value, "Where")
    greater = producer(where.inputs[0], "Greater") if where else None
    threshold = scalar(greater.inputs[1]) if greater else None
    if threshold is None or threshold < _SOFTPLUS_LINEAR_FROM:
        return None
    x, small = greater.inputs[0], _softplus(where.inputs[2])
    if where.inputs[1] is not x or small is None or small[0] is not x:
        return None
    return x, [where, greater, *small[1]]


class ReplaceActivationOp(RewriteRule):
    """The ONNX ops Gelu (either approximation), Swish with alpha 1, HardSwish and Mish ->
    the same activation as ``kiln::Activation``, which epilogue fusions absorb."""

    def __init__(self, anchor: str) -> None:
        self.anchor = anchor

    def match(self, node: ir.Node) -> Match | str:
        if node.op_type == "Gelu":
            approximate = node.attributes.get_string("approximate", "none")
            activation = {"none": "Gelu", "tanh": "GeluTanh"}.get(approximate)
        elif node.op_type == "Swish":
            activation = "Silu" if node.attributes.get_float("alpha", 1.0) == 1.0 else None
        else:
            activation = node.op_type
        if activation is None:
            return f"{node.op_type} with attributes that no kiln activation has"
        return Match([node], [node.outputs[0]], {"activation": activation})

    def rewrite(self, match: Match) -> list[ir.Node]:
        node = match.nodes[0]
        return [kiln_node("Activation", [node.inputs[0]], {"activation": match.bindings["activation"]},
                          name=node.name)]


def fuse_activations() -> RewritePass:
    """Every activation this module recognises, as ``kiln::Activation``."""
    gated = [rule(anchor) for rule in (FuseGeluErf, FuseGeluTanh, FuseHardSwish, FuseMish, FuseSilu)
             for anchor in ("Mul", "Div")]
    ops = [ReplaceActivationOp(op) for op in ("Gelu", "Swish", "HardSwish", "Mish")]
    return RewritePass(*ops, *gated, name="FuseActivations")
