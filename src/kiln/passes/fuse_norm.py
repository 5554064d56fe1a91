"""Layer and RMS normalization, fused into ``kiln::LayerNorm`` and ``kiln::RMSNorm``.

Three sources: ONNX's LayerNormalization / RMSNormalization ops; the decomposed arithmetic that
exporters emit for hand-written norms (torch's ``(x - mean) / sqrt(var + eps) * w + b`` and
LLaMA/T5's ``w * (x * rsqrt(mean(x²) + eps))``, possibly computed in float32 between Casts); and
then a residual ``Add(x, r)`` feeding a fused norm, which it absorbs (pre-LN transformers), exposing
the sum as a second output when something else reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from kiln.passes.rewrite import (
    KILN_DOMAIN,
    Match,
    RewritePass,
    RewriteRule,
    constant,
    is_float,
    kiln_node,
    producer,
    same_shape,
    scalar,
)


def _other_outputs_unused(node: ir.Node) -> bool:
    return not any(v.uses() or v.is_graph_output() for v in node.outputs[1:])


def _norm_attributes(node: ir.Node) -> dict[str, int | float]:
    """axis and epsilon of an ONNX or kiln norm node (their defaults agree)."""
    return {"axis": node.attributes.get_int("axis", -1),
            "epsilon": node.attributes.get_float("epsilon", 1e-5)}


# --- ONNX's norm ops -----------------------------------------------------------------------------

class LayerNormalizationToLayerNorm(RewriteRule):
    """LayerNormalization (its Y only, statistics in float32) -> kiln::LayerNorm."""

    anchor = "LayerNormalization"

    def match(self, node: ir.Node) -> Match | str:
        if not _other_outputs_unused(node):
            return f"{node.name}: its mean or inverse standard deviation is read"
        if node.attributes.get_int("stash_type", 1) != ir.DataType.FLOAT:
            return f"{node.name}: statistics are not in float32"
        return Match([node], [node.outputs[0]])

    def rewrite(self, match: Match) -> list[ir.Node]:
        node = match.nodes[0]
        return [kiln_node("LayerNorm", node.inputs[:3], _norm_attributes(node), node.name)]


class RMSNormalizationToRMSNorm(RewriteRule):
    """RMSNormalization (opset 23, statistics in float32) -> kiln::RMSNorm."""

    anchor = "RMSNormalization"

    def match(self, node: ir.Node) -> Match | str:
        if node.attributes.get_int("stash_type", 1) != ir.DataType.FLOAT:
            return f"{node.name}: statistics are not in float32"
        return Match([node], [node.outputs[0]])

    def rewrite(self, match: Match) -> list[ir.Node]:
        node = match.nodes[0]
        return [kiln_node("RMSNorm", node.inputs[:2], _norm_attributes(node), node.name)]


# --- decomposed norms ----------------------------------------------------------------------------

@dataclass
class Normalized:
    """A decomposed normalization of ``x`` over its axes from ``axis`` on, made by ``nodes``."""

    x: ir.Value
    axis: int
    epsilon: float
    nodes: list[ir.Node]
    widened: bool = False  # computed in float32 on Casts of x


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    # torch's unoptimized export spells constant axes as Reshape(Constant, Constant).
    reshape = producer(value, "Reshape")
    array = constant(reshape.inputs[0] if reshape is not None else value)
    return None if array is None or array.dtype.kind not in "iu" else array.reshape(-1).tolist()


def _trailing_axis(mean: ir.Node) -> int | str:
    """The ReduceMean's axes, when they are the trailing ones with kept dims, as a negative axis."""
    if mean.attributes.get_int("keepdims", 1) != 1:
        return f"{mean.name}: does not keep the reduced dims"
    axes = mean.attributes.get_ints("axes", None)
    if axes is None:  # an input from opset 18 on
        axes = _constant_ints(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if not axes:
        return f"{mean.name}: axes are not constant"
    shape = mean.inputs[0].shape
    if any(a >= 0 for a in axes) and shape is None:
        return f"{mean.name}: positive axes on an input of unknown rank"
    negative = sorted(a - shape.rank() if a >= 0 else a for a in axes)
    if negative != list(range(-len(axes), 0)):
        return f"{mean.name}: axes {list(axes)} are not the trailing ones"
    return -len(axes)


def _mean_of(value: ir.Value) -> tuple[ir.Value, int, ir.Node] | str:
    """value = ReduceMean(x) over trailing axes -> (x, axis, the ReduceMean)."""
    mean = producer(value, "ReduceMean")
    if mean is None:
        return f"{value.name} is not a ReduceMean"
    axis = _trailing_axis(mean)
    return axis if isinstance(axis, str) else (mean.inputs[0], axis, mean)


def _source(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """The value before a Cast to float32 (with that Cast), or the value itself."""
    cast = producer(value, "Cast")
    if cast is not None and cast.attributes.get_int("to", 0) == ir.DataType.FLOAT:
        return cast.inputs[0], [cast]
    return value, []


def _same_source(a: ir.Value, b: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
    """a and b are one value, or float32 Casts of one value (exporters may cast it per use)."""
    (source, a_casts), (b_source, b_casts) = _source(a), _source(b)
    if source is not b_source or bool(a_casts) != bool(b_casts):
        return f"{a.name} and {b.name} are not the same tensor"
    return source, list({id(n): n for n in a_casts + b_casts}.values())


def _square_of(value: ir.Value) -> tuple[ir.Value, ir.Node] | str:
    """value = Pow(x, 2) or Mul(x, x) -> (x, the node)."""
    node = producer(value, ("Pow", "Mul"))
    if node is None:
        return f"{value.name} is not a square"
    base, other = node.inputs
    squares = scalar(other) == 2.0 if node.op_type == "Pow" else base is other
    return (base, node) if squares else f"{value.name} is not a square"


def _over_root(value: ir.Value) -> tuple[ir.Value, ir.Value, list[ir.Node]] | str:
    """value = n / Sqrt(s) or n * Reciprocal(Sqrt(s)), either order -> (n, s, nodes)."""
    node = producer(value, ("Div", "Mul"))
    if node is None:
        return f"{value.name} is not a Div or Mul"
    if node.op_type == "Div":
        sqrt = producer(node.inputs[1], "Sqrt")
        if sqrt is None:
            return f"{node.name}: not a division by a Sqrt"
        return node.inputs[0], sqrt.inputs[0], [node, sqrt]
    for numerator, denominator in (node.inputs, node.inputs[::-1]):
        reciprocal = producer(denominator, "Reciprocal")
        sqrt = producer(reciprocal.inputs[0], "Sqrt") if reciprocal is not None else None
        if sqrt is not None:
            return numerator, sqrt.inputs[0], [node, reciprocal, sqrt]
    return f"{node.name}: not by a Reciprocal(Sqrt)"


def _plus_epsilon(value: ir.Value) -> tuple[ir.Value, float, ir.Node] | str:
    """value = Add(v, eps) with a constant scalar eps, either order -> (v, eps, the Add)."""
    add = producer(value, "Add")
    for v, eps in (add.inputs, add.inputs[::-1]) if add is not None else ():
        epsilon = scalar(eps)
        if epsilon is not None:
            return v, epsilon, add
    return f"{value.name} is not an Add of a constant epsilon"


def _by_root_of_mean(value: ir.Value) -> tuple[ir.Value, ir.Value, int, float, list[ir.Node]] | str:
    """value = n / sqrt(mean(s) + eps), spelled either way -> (n, s, axis, eps, nodes)."""
    found = _over_root(value)
    if isinstance(found, str):
        return found
    numerator, root_of, root_nodes = found
    found = _plus_epsilon(root_of)
    if isinstance(found, str):
        return found
    mean_value, epsilon, add = found
    found = _mean_of(mean_value)
    if isinstance(found, str):
        return found
    squared, axis, mean = found
    return numerator, squared, axis, epsilon, [*root_nodes, add, mean]


def _layer_normalized(value: ir.Value) -> Normalized | str:
    """value = (x - mean(x)) / sqrt(mean((x - mean(x))²) + eps)."""
    found = _by_root_of_mean(value)
    if isinstance(found, str):
        return found
    centered, squared, axis, epsilon, nodes = found
    found = _square_of(squared)
    if isinstance(found, str):
        return found
    base, square = found
    sub = producer(centered, "Sub")
    if base is not centered or sub is None:
        return f"{centered.name} is not the centered input"
    found = _mean_of(sub.inputs[1])
    if isinstance(found, str):
        return found
    mean_input, mean_axis, mean = found
    if mean_axis != axis:
        return f"{mean.name}: mean and variance are over different axes"
    found = _same_source(sub.inputs[0], mean_input)
    if isinstance(found, str):
        return found
    x, casts = found
    return Normalized(x, axis, epsilon, [*nodes, square, sub, mean, *casts], bool(casts))


def _rms_normalized(value: ir.Value) -> Normalized | str:
    """value = x / sqrt(mean(x²) + eps)."""
    found = _by_root_of_mean(value)
    if isinstance(found, str):
        return found
    numerator, squared, axis, epsilon, nodes = found
    found = _square_of(squared)
    if isinstance(found, str):
        return found
    base, square = found
    found = _same_source(numerator, base)
    if isinstance(found, str):
        return found
    x, casts = found
    return Normalized(x, axis, epsilon, [*nodes, square, *casts], bool(casts))


def _normalized_in_type(value: ir.Value, normalized) -> Normalized | str:
    """``normalized(value)``, looking through float32 Casts that return to x's type."""
    cast_back = producer(value, "Cast")
    if cast_back is not None:
        found = normalized(cast_back.inputs[0])
        if (not isinstance(found, str) and found.widened
                and cast_back.attributes.get_int("to", 0) == found.x.dtype):
            found.nodes.append(cast_back)
            return found
    found = normalized(value)
    if isinstance(found, Normalized) and found.widened and found.x.dtype != ir.DataType.FLOAT:
        return f"{value.name} is computed in float32 but not cast back to {found.x.name}'s type"
    return found


def _affine(param: ir.Value, norm: Normalized) -> str | None:
    """Why the constant ``param`` cannot scale or shift the normalized axes, or None if it can."""
    array = constant(param)
    if array is None:
        return f"{param.name} is not a constant"
    if not is_float(param) or param.dtype != norm.x.dtype:
        return f"{param.name} is not of {norm.x.name}'s floating-point type"
    if array.ndim > -norm.axis:
        return f"{param.name} of shape {array.shape} spans more than the normalized axes"
    shape = norm.x.shape
    trailing = list(shape)[len(shape) - array.ndim:] if shape is not None else [None] * array.ndim
    if any(d != 1 and d != n for d, n in zip(array.shape, trailing)):
        return f"{param.name} of shape {array.shape} does not match the normalized axes"
    return None


def _affine_layer_norm(value: ir.Value) -> tuple[Normalized, ir.Value] | str:
    """value = Mul(normalized, scale), either order, with a constant scale."""
    mul = producer(value, "Mul")
    reasons = []
    for normalized, scale in (mul.inputs, mul.inputs[::-1]) if mul is not None else ():
        found = _normalized_in_type(normalized, _layer_normalized)
        reason = found if isinstance(found, str) else _affine(scale, found)
        if reason is None:
            found.nodes.append(mul)
            return found, scale
        reasons.append(reason)
    return "; ".join(reasons) or f"{value.name} is not a Mul"


def _fused_norm(match: Match) -> list[ir.Node]:
    """The kiln norm of a decomposed one: bindings ``op_type``, ``inputs`` and ``norm``."""
    norm = match.bindings["norm"]
    attributes = {"axis": norm.axis, "epsilon": norm.epsilon}
    name = match.nodes[-1].name
    return [kiln_node(match.bindings["op_type"], match.bindings["inputs"], attributes, name)]


class FuseDecomposedLayerNorm(RewriteRule):
    """normalized(x) * scale + bias, operands either way -> kiln::LayerNorm(x, scale, bias)."""

    anchor = "Add"

    def match(self, node: ir.Node) -> Match | str:
        reasons = []
        for scaled, bias in (node.inputs, node.inputs[::-1]):
            found = _affine_layer_norm(scaled)
            reason = found if isinstance(found, str) else _affine(bias, found[0])
            if reason is None:
                norm, scale = found
                bindings = {"op_type": "LayerNorm", "inputs": [norm.x, scale, bias], "norm": norm}
                return Match([*norm.nodes, node], [node.outputs[0]], bindings)
            reasons.append(reason)
        return "; ".join(reasons)

    def rewrite(self, match: Match) -> list[ir.Node]:
        return _fused_norm(match)


class FuseDecomposedLayerNormWithoutBias(RewriteRule):
    """normalized(x) * scale -> kiln::LayerNorm(x, scale); runs after the rule with a bias."""

    anchor = "Mul"

    def match(self, node: ir.Node) -> Match | str:
        found = _affine_layer_norm(node.outputs[0])
        if isinstance(found, str):
            return found
        norm, scale = found
        bindings = {"op_type": "LayerNorm", "inputs": [norm.x, scale], "norm": norm}
        return Match(norm.nodes, [node.outputs[0]], bindings)

    def rewrite(self, match: Match) -> list[ir.Node]:
        return _fused_norm(match)


class FuseDecomposedRMSNorm(RewriteRule):
    """x / sqrt(mean(x²) + eps) * scale, LLaMA/T5 spellings -> kiln::RMSNorm(x, scale)."""

    anchor = "Mul"

    def match(self, node: ir.Node) -> Match | str:
        reasons = []
        for normalized, scale in (node.inputs, node.inputs[::-1]):
            norm = _normalized_in_type(normalized, _rms_normalized)
            reason = norm if isinstance(norm, str) else _affine(scale, norm)
            if reason is None:
                bindings = {"op_type": "RMSNorm", "inputs": [norm.x, scale], "norm": norm}
                return Match([*norm.nodes, node], [node.outputs[0]], bindings)
            reasons.append(reason)
        return "; ".join(reasons)

    def rewrite(self, match: Match) -> list[ir.Node]:
        return _fused_norm(match)


# --- residual ------------------------------------------------------------------------------------

RESIDUAL_INPUT = {"LayerNorm": 3, "RMSNorm": 2}


class FuseResidualIntoNorm(RewriteRule):
    """norm(Add(x, r)) with x, r of one shape -> norm(x, ..., residual=r), outputting the sum too
    when it is read elsewhere. One instance per kiln norm op."""

    anchor_domain = KILN_DOMAIN

    def __init__(self, op_type: str) -> None:
        self.anchor = op_type

    def match(self, node: ir.Node) -> Match | str:
        index = RESIDUAL_INPUT[node.op_type]
        if len(node.inputs) > index or len(node.outputs) > 1:
            return f"{node.name} already adds a residual"
        add = producer(node.inputs[0], "Add")
        if add is None:
            return f"{node.name}: X is not made by an Add"
        x, residual = add.inputs
        if not same_shape(x, residual):
            return f"{add.name}: its operands are not known to have one shape"
        total = add.outputs[0]
        read_elsewhere = total.is_graph_output() or any(u is not node for u, _ in total.uses())
        outputs = [node.outputs[0], total] if read_elsewhere else [node.outputs[0]]
        return Match([add, node], outputs, {"x": x, "residual": residual})

    def rewrite(self, match: Match) -> list[ir.Node]:
        add, node = match.nodes
        inputs = [match.bindings["x"], *node.inputs[1:]]
        inputs += [None] * (RESIDUAL_INPUT[node.op_type] - len(inputs))  # an absent bias
        inputs.append(match.bindings["residual"])
        return [kiln_node(node.op_type, inputs, _norm_attributes(node), node.name,
                          num_outputs=len(match.outputs))]


def fuse_norm() -> RewritePass:
    # Decomposed norms with a bias are matched before those without, which would take their Mul;
    # residuals are absorbed last, into the norms all other rules made.
    return RewritePass(
        LayerNormalizationToLayerNorm(),
        RMSNormalizationToRMSNorm(),
        FuseDecomposedLayerNorm(),
        FuseDecomposedLayerNormWithoutBias(),
        FuseDecomposedRMSNorm(),
        FuseResidualIntoNorm("LayerNorm"),
        FuseResidualIntoNorm("RMSNorm"),
        name="FuseNorm",
    )
