"""Triton source for one ``kiln::Pointwise`` group: every op of its body in one kernel.

The kernel walks the outputs' shape as one flat range of ``BLOCK``-sized pieces. The launcher
(:mod:`kiln.kernels.triton_pointwise`) collapses that shape to at most :data:`MAX_RANK` dimensions
and passes them as sizes ``s0..s5`` (innermost last, padded with 1s), with each operand's
broadcast strides (0 along broadcast dimensions). Operands are the group's inputs, then its
constants of more than one element. A constexpr ``MODE`` per operand picks how it is read: at the
output's own offsets (same layout), as one element for all (a scalar), or through its strides.

Floating values (float16, bfloat16, float32) are computed in float32 and stored in each output's
type; integers and bools keep their own type. A body with an op, attribute or type without an
exact form here raises :class:`UnsupportedBody`, and the ``ops`` reference runs it instead.
Numerics follow the reference: IEEE division and square root (``div_rn``, ``sqrt_rn``), Max/Min
and Clip that propagate NaN, Cast rounding through the target type; integer Div, Mod and general
Pow are refused.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_RANK = 6
FLOAT_MAX = float(np.finfo(np.float32).max)
KERNEL_NAME = "pointwise_kernel"
# How an operand is read (its constexpr MODE).
SAME_LAYOUT, SCALAR, STRIDED = 0, 1, 2

FLOAT, UINT8, INT8, INT16, INT32, INT64, BOOL, FLOAT16, BFLOAT16 = 1, 2, 3, 5, 6, 7, 9, 10, 16
FLOATS = (FLOAT, FLOAT16, BFLOAT16)
INTEGERS = (INT32, INT64)
# The Triton type each supported ONNX type is stored in, and NumPy's for constants.
STORED = {FLOAT: "tl.float32", FLOAT16: "tl.float16", BFLOAT16: "tl.bfloat16", INT32: "tl.int32",
          INT64: "tl.int64", BOOL: "tl.int1"}
_NUMPY = {FLOAT: np.float32, FLOAT16: np.float16, INT32: np.int32, INT64: np.int64, BOOL: np.bool_}

_PRELUDE = '''\
import triton
import triton.language as tl


# Defined here rather than taken from triton.language.standard: Triton's interpreter runs only
# the jit functions decorated after TRITON_INTERPRET was set (3.6 refuses the others).
@triton.jit
def _sigmoid(x):
    return tl.div_rn(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softplus(x):  # torch's threshold: x itself above 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
'''


class UnsupportedBody(Exception):
    """The body holds something the generator has no exact Triton form for (the reason)."""


@dataclass(frozen=True)
class GeneratedKernel:
    source: str
    num_operands: int  # inputs, then the constants passed as tensors
    used_operands: tuple[int, ...]  # the operands the outputs read; their broadcast is the shape
    output_types: tuple[int, ...]  # ONNX element types


@dataclass(frozen=True)
class _Value:
    expr: str  # a variable of the kernel
    dtype: int  # ONNX type; floating types are held in float32


def generate(program: dict[str, Any]) -> GeneratedKernel:
    """The kernel for a body described by :func:`kiln.lowering.pointwise_body.describe_body`."""
    try:
        return _Generator(program).kernel()
    except (TypeError, KeyError, ValueError, IndexError) as error:  # attributes it does not know
        raise UnsupportedBody(f"{type(error).__name__}: {error}") from error


def decode_constant(entry: dict[str, Any]) -> np.ndarray:
    """A constant of the body as a NumPy array (bfloat16 widened exactly to float32)."""
    raw = base64.b64decode(entry["data"])
    if entry["dtype"] == BFLOAT16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(entry["shape"])
    if entry["dtype"] not in _NUMPY:
        raise UnsupportedBody(f"constant of ONNX type {entry['dtype']}")
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[entry["dtype"]]).newbyteorder("<")).reshape(entry["shape"])


class _Generator:
    def __init__(self, program: dict[str, Any]) -> None:
        self.program = program
        self.lines: list[str] = []
        self.values: dict[str, _Value] = {}
        self.scalars: dict[str, float | int | bool] = {}  # constants of one element, by value
        self.operands: list[tuple[str, int]] = []  # (body value, ONNX type)
        self.count = 0

    def kernel(self) -> GeneratedKernel:
        program = self.program
        for index, entry in enumerate(program["inputs"]):
            self.operands.append((f"i{index}", _supported_type(entry["dtype"])))
        for index, entry in enumerate(program["constants"]):
            name, array = f"c{index}", decode_constant(entry)
            _supported_type(entry["dtype"])
            if array.size == 1:
                self.scalars[name] = array.reshape(()).item()
                self.values[name] = self._scalar(array.reshape(()).item(), entry["dtype"])
            else:
                self.operands.append((name, entry["dtype"]))
        used = self._used_operands()
        for position in used:
            name, dtype = self.operands[position]
            self.values[name] = self._load(position, dtype)
        for node in program["nodes"]:
            self._node(node)
        output_types = []
        for index, name in enumerate(program["outputs"]):
            value = self._get(name)
            output_types.append(value.dtype)
            self.lines.append(f"tl.store(out{index} + offs, {self._stored(value)}, mask=mask)")
        return GeneratedKernel(self._source(), len(self.operands), tuple(used), tuple(output_types))

    # --- the kernel around the body ------------------------------------------------------------

    def _source(self) -> str:
        n = len(self.operands)
        pointers = [f"in{k}" for k in range(n)] + [f"out{k}" for k in range(len(self.program["outputs"]))]
        sizes = [f"s{d}" for d in range(MAX_RANK)]
        strides = [f"t{k}_{d}" for k in range(n) for d in range(MAX_RANK)]
        modes = [f"MODE{k}: tl.constexpr" for k in range(n)]
        parameters = [*pointers, "n", *sizes, *strides, "BLOCK: tl.constexpr", "WIDE: tl.constexpr", *modes]
        index = [
            "if WIDE:  # offsets past 2**31",
            "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
            "else:",
            "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
            "mask = offs < n",
            "rem = offs",
        ]
        for d in range(MAX_RANK - 1, 0, -1):
            index += [f"i{d} = rem % s{d}", f"rem = rem // s{d}"]
        index.append("i0 = rem")
        body = "\n".join(f"    {line}" for line in [*index, *self.lines])
        signature = ",\n    ".join(parameters)
        return f"{_PRELUDE}\n\n@triton.jit\ndef {KERNEL_NAME}(\n    {signature},\n):\n{body}\n"

    def _used_operands(self) -> list[int]:
        """The operands the outputs depend on, in order."""
        producers = {out: node for node in self.program["nodes"] for out in node["outputs"]}
        needed, pending = set(), list(self.program["outputs"])
        while pending:
            name = pending.pop()
            if name in needed:
                continue
            needed.add(name)
            if name in producers:
                pending += [v for v in producers[name]["inputs"] if v is not None]
        return [k for k, (name, _) in enumerate(self.operands) if name in needed]

    def _load(self, k: int, dtype: int) -> _Value:
        strided = " + ".join(f"i{d} * t{k}_{d}" for d in range(MAX_RANK))
        self.lines += [
            f"if MODE{k} == {SAME_LAYOUT}:",
            f"    x{k} = tl.load(in{k} + offs, mask=mask)",
            f"elif MODE{k} == {SCALAR}:",
            f"    x{k} = tl.broadcast_to(tl.load(in{k}), [BLOCK])",
            "else:",
            f"    x{k} = tl.load(in{k} + ({strided}), mask=mask)",
        ]
        return self._assign(f"x{k}.to(tl.float32)" if dtype in FLOATS else f"x{k}", dtype)

    def _scalar(self, value: float | int | bool, dtype: int) -> _Value:
        if dtype in FLOATS:
            value = float(np.float32(value))
            if math.isfinite(value):
                return self._assign(f"tl.full([BLOCK], {value!r}, tl.float32)", dtype)
            bits = int(np.array(value, dtype=np.float32).view(np.int32))
            return self._assign(f"tl.full([BLOCK], {bits}, tl.int32).to(tl.float32, bitcast=True)", dtype)
        return self._assign(f"tl.full([BLOCK], {int(value)}, {STORED[dtype]})", dtype)

    def _stored(self, value: _Value) -> str:
        return f"{value.expr}.to({STORED[value.dtype]})" if value.dtype in (FLOAT16, BFLOAT16) else value.expr

    def _assign(self, expr: str, dtype: int) -> _Value:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        return _Value(name, dtype)

    def _get(self, name: str | None) -> _Value:
        if name not in self.values:
            raise UnsupportedBody(f"value {name!r} is not made in the body")
        return self.values[name]

    # --- ops ------------------------------------------------------------------------------------

    def _node(self, node: dict[str, Any]) -> None:
        op = node["op"] if node["domain"] == "" else f"{node['domain']}::{node['op']}"
        emit = _OPS.get(op)
        if emit is None:
            raise UnsupportedBody(f"op {op}")
        if len(node["outputs"]) != 1:
            raise UnsupportedBody(f"{op} with {len(node['outputs'])} outputs")
        attributes = node["attributes"]
        if any(isinstance(v, dict) for v in attributes.values()):
            raise UnsupportedBody(f"{op} with a tensor or graph attribute")
        out = node["outputs"][0]
        declared = self.program["types"].get(out, 0)  # 0: shape inference left it untyped
        args = [None if name is None else self._get(name) for name in node["inputs"]]
        expr, dtype = emit(self, args, attributes, declared)
        if declared and dtype != declared:
            raise UnsupportedBody(f"{op} declared {declared}, computes {dtype}")
        self.values[out] = self._assign(expr, dtype)

    def scalar_of(self, value: _Value | None) -> float | int | None:
        """The value of a one-element constant (Clip bounds, Pow exponents), else None."""
        for name, known in self.values.items():
            if known is value and name in self.scalars:
                return self.scalars[name]
        return None


def _supported_type(dtype: int) -> int:
    if dtype not in STORED:
        raise UnsupportedBody(f"ONNX element type {dtype}")
    return dtype


Emit = Callable[[_Generator, list, dict, int], tuple[str, int]]


def _floats(fn: Callable[..., str]) -> Emit:
    """An op on floating inputs whose result has the first input's type."""
    def emit(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
        if not args or any(a is None or a.dtype not in FLOATS for a in args):
            raise UnsupportedBody("a float op on non-float inputs")
        return fn(*(a.expr for a in args), **attributes), args[0].dtype
    return emit


def _numbers(fn: Callable[..., str], result: int | None = None) -> Emit:
    """An op on inputs of one numeric type (float or integer): the result has that type, or
    ``result``."""
    def emit(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
        if not args or any(a is None for a in args) or len({a.dtype for a in args}) != 1 \
                or args[0].dtype == BOOL:
            raise UnsupportedBody("mixed or boolean operands")
        kind = "float" if args[0].dtype in FLOATS else "int"
        return fn(kind, *(a.expr for a in args), **attributes), result or args[0].dtype
    return emit


def _bools(fn: Callable[..., str]) -> Emit:
    def emit(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
        if any(a is None or a.dtype != BOOL for a in args):
            raise UnsupportedBody("a logical op on non-bool inputs")
        return fn(*(a.expr for a in args)), BOOL
    return emit


def _integers(fn: Callable[..., str]) -> Emit:
    def emit(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
        if any(a is None or a.dtype not in INTEGERS for a in args) or len({a.dtype for a in args}) != 1:
            raise UnsupportedBody("a bitwise op on non-integer inputs")
        return fn(*(a.expr for a in args)), args[0].dtype
    return emit


def _fold(operator: str) -> Callable[..., str]:
    """Variadic Max/Min; floats propagate NaN as torch.maximum/minimum do."""
    def fold(kind: str, *xs: str, consumed_inputs: Any = None) -> str:
        nan = ", propagate_nan=tl.PropagateNan.ALL" if kind == "float" else ""
        expr = xs[0]
        for x in xs[1:]:
            expr = f"tl.{operator}({expr}, {x}{nan})"
        return expr
    return fold


def _no_legacy_broadcast(fn: Callable[..., str]) -> Callable[..., str]:
    """Binary ops of opsets before 7 align B with ``axis`` when asked; those are refused."""
    def checked(*args: str, broadcast: int = 0, axis: int | None = None, consumed_inputs: Any = None) -> str:
        if broadcast:
            raise UnsupportedBody("legacy broadcast attribute")
        return fn(*args)
    return checked


def _divide(kind: str, a: str, b: str) -> str:
    if kind != "float":
        raise UnsupportedBody("integer Div (truncation)")
    return f"tl.div_rn({a}, {b})"


# Exponents with an exact form; others (and tensors) need a general pow and are refused.
_POWERS = {1.0: "{0}", 2.0: "{0} * {0}", 3.0: "{0} * {0} * {0}", 0.5: "tl.sqrt_rn({0})",
           -1.0: "tl.div_rn(1.0, {0})"}


def _power(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
    base, exponent = args
    value = gen.scalar_of(exponent)
    if base.dtype not in FLOATS or value is None or float(value) not in _POWERS:
        raise UnsupportedBody("Pow other than by a constant 1, 2, 3, 0.5 or -1")
    if float(value) == 0.5:  # std::pow(-inf, 0.5) is +inf, sqrt(-inf) NaN
        return f"tl.where({base.expr} < -{FLOAT_MAX!r}, -{base.expr}, tl.sqrt_rn({base.expr}))", base.dtype
    return _POWERS[float(value)].format(base.expr), base.dtype


def _clip(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
    x, *bounds = args + [None] * (3 - len(args))
    if x.dtype == BOOL:
        raise UnsupportedBody("Clip of bools")
    low, high = attributes.get("min"), attributes.get("max")
    if len(args) > 1:  # opset 11: bounds are inputs, constants in a body
        low, high = (None if b is None else gen.scalar_of(b) for b in bounds)
        if any(b is not None and gen.scalar_of(b) is None for b in bounds):
            raise UnsupportedBody("Clip bounds that are not constants")
    return _clamp_expr(x, low, high), x.dtype


def _clamp_expr(x: _Value, low: float | int | None, high: float | int | None) -> str:
    """torch.clamp: NaN passes through, and ``high`` wins where ``low > high``."""
    if x.dtype in FLOATS:
        low = None if low is None or float(low) == -math.inf else float(np.float32(low))
        high = None if high is None or float(high) == math.inf else float(np.float32(high))
        if any(b is not None and not math.isfinite(b) for b in (low, high)):
            raise UnsupportedBody("Clip to an infinite or NaN bound")
    else:
        low, high = (None if b is None else int(b) for b in (low, high))
    return _clamp(x.expr, low, high)


def _clamp(x: str, low: float | int | None, high: float | int | None) -> str:
    if low is not None:
        x = f"tl.where({x} < {low!r}, {low!r}, {x})"
    if high is not None:
        x = f"tl.where({x} > {high!r}, {high!r}, {x})"
    return x


def _where(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
    condition, a, b = args
    if condition.dtype != BOOL or a.dtype != b.dtype:
        raise UnsupportedBody("Where with a non-bool condition or mixed branches")
    return f"tl.where({condition.expr}, {a.expr}, {b.expr})", a.dtype


def _cast(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
    (x,), to = args, attributes.get("to")
    if not isinstance(to, int) or to not in STORED:
        raise UnsupportedBody(f"Cast to ONNX type {to}")
    if to == BOOL:
        return f"{x.expr} != 0", to
    if to in FLOATS:
        if to == FLOAT:
            return f"{x.expr}.to(tl.float32)", to
        return f"{x.expr}.to({STORED[to]}).to(tl.float32)", to  # round as the reference stores it
    return f"{x.expr}.to({STORED[to]})", to  # from float: truncation toward zero, as torch


def _is_inf(x: str, detect_negative: int = 1, detect_positive: int = 1) -> str:
    # beyond the largest finite float32 lie only the infinities
    found = [f"({x} > {FLOAT_MAX!r})"] * bool(detect_positive) + [f"({x} < -{FLOAT_MAX!r})"] * bool(detect_negative)
    return " | ".join(found) or f"({x} != {x}) & ({x} == {x})"  # neither: false everywhere


def _gelu(x: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        return f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
    if approximate != "none":
        raise UnsupportedBody(f"Gelu approximate={approximate!r}")
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _elu(x: str, alpha: float = 1.0) -> str:
    return f"tl.where({x} > 0, {x}, {alpha!r} * (tl.exp({x}) - 1.0))"


def _hard_sigmoid(x: str, alpha: float = 0.2, beta: float = 0.5) -> str:
    return _clamp(f"({alpha!r} * {x} + {beta!r})", 0.0, 1.0)


def _hard_swish(x: str) -> str:
    return f"tl.div_rn({x} * {_clamp(f'({x} + 3.0)', 0.0, 6.0)}, 6.0)"


def _leaky_relu(x: str, alpha: float = 0.01) -> str:
    return f"tl.where({x} > 0, {x}, {x} * {alpha!r})"


def _activation(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
    """``kiln::Activation``, with the parameters ``kiln.ops.activation`` gives each."""
    (x,) = args
    name, params = attributes.get("activation", ""), attributes.get("activation_params") or []
    if x.dtype not in FLOATS:
        raise UnsupportedBody("kiln::Activation of a non-float input")
    if not name:
        return x.expr, x.dtype
    if name == "Clip":
        return _clamp_expr(x, params[0], params[1]), x.dtype
    forms: dict[str, Callable[[], str]] = {
        "Relu": lambda: _relu("float", x.expr),
        "LeakyRelu": lambda: _leaky_relu(x.expr, params[0] if params else 0.01),
        "Elu": lambda: _elu(x.expr, params[0] if params else 1.0),
        "Sigmoid": lambda: f"_sigmoid({x.expr})",
        "HardSigmoid": lambda: _hard_sigmoid(x.expr, params[0] if params else 0.2,
                                             params[1] if params else 0.5),
        "Tanh": lambda: f"_tanh({x.expr})",
        "Silu": lambda: f"{x.expr} * _sigmoid({x.expr})",
        "HardSwish": lambda: _hard_swish(x.expr),
        "Gelu": lambda: _gelu(x.expr),
        "GeluTanh": lambda: _gelu(x.expr, "tanh"),
        "Mish": lambda: f"{x.expr} * _tanh(_softplus({x.expr}))",
        "Softplus": lambda: f"_softplus({x.expr})",
    }
    if name not in forms:
        raise UnsupportedBody(f"activation {name!r}")
    return forms[name](), x.dtype


def _relu(kind: str, x: str, consumed_inputs: Any = None) -> str:
    zero = "0.0" if kind == "float" else "0"
    return f"tl.where({x} < {zero}, {zero}, {x})"  # NaN stays NaN


def _unary(template: str) -> Callable[..., str]:
    def form(x: str, consumed_inputs: Any = None) -> str:
        return template.format(x)
    return form


def _binary(template: str) -> Callable[..., str]:
    return _no_legacy_broadcast(lambda a, b: template.format(a, b))


def _arithmetic(template: str) -> Callable[..., str]:
    return _no_legacy_broadcast(lambda kind, a, b: template.format(a, b))


def _compare(template: str) -> Emit:
    compare = _numbers(_arithmetic(template), result=BOOL)

    def emit(gen: _Generator, args: list, attributes: dict, declared: int) -> tuple[str, int]:
        if len(args) == 2 and all(a is not None and a.dtype == BOOL for a in args) and "==" in template:
            return _binary(template)(args[0].expr, args[1].expr, **attributes), BOOL
        return compare(gen, args, attributes, declared)
    return emit


_OPS: dict[str, Emit] = {
    "Add": _numbers(_arithmetic("{0} + {1}")),
    "Sub": _numbers(_arithmetic("{0} - {1}")),
    "Mul": _numbers(_arithmetic("{0} * {1}")),
    "Div": _numbers(_no_legacy_broadcast(_divide)),
    "Pow": _power,
    "Max": _numbers(_fold("maximum")),
    "Min": _numbers(_fold("minimum")),
    "Neg": _numbers(lambda kind, x, consumed_inputs=None: f"-{x}"),
    "Abs": _numbers(lambda kind, x, consumed_inputs=None: f"tl.abs({x})"),
    "Relu": _numbers(_relu),
    "Clip": _clip,
    "Where": _where,
    "Equal": _compare("{0} == {1}"),
    "Less": _compare("{0} < {1}"),
    "Greater": _compare("{0} > {1}"),
    "LessOrEqual": _compare("{0} <= {1}"),
    "GreaterOrEqual": _compare("{0} >= {1}"),
    "And": _bools(lambda a, b: f"{a} & {b}"),
    "Or": _bools(lambda a, b: f"{a} | {b}"),
    "Xor": _bools(lambda a, b: f"{a} ^ {b}"),
    "Not": _bools(lambda x: f"{x} == 0"),
    "BitwiseAnd": _integers(lambda a, b: f"{a} & {b}"),
    "BitwiseOr": _integers(lambda a, b: f"{a} | {b}"),
    "BitwiseXor": _integers(lambda a, b: f"{a} ^ {b}"),
    "Cast": _cast,
    "Sigmoid": _floats(_unary("_sigmoid({0})")),
    "Tanh": _floats(_unary("_tanh({0})")),
    "Exp": _floats(_unary("tl.exp({0})")),
    "Log": _floats(_unary("tl.log({0})")),
    "Sqrt": _floats(_unary("tl.sqrt_rn({0})")),
    "Reciprocal": _floats(_unary("tl.div_rn(1.0, {0})")),
    "Erf": _floats(_unary("tl.erf({0})")),
    "Floor": _floats(_unary("tl.floor({0})")),
    "Ceil": _floats(_unary("tl.ceil({0})")),
    "Sin": _floats(_unary("tl.sin({0})")),
    "Cos": _floats(_unary("tl.cos({0})")),
    "Softsign": _floats(_unary("tl.div_rn({0}, 1.0 + tl.abs({0}))")),
    "Softplus": _floats(_unary("_softplus({0})")),
    "Mish": _floats(_unary("{0} * _tanh(_softplus({0}))")),
    "HardSwish": _floats(lambda x: _hard_swish(x)),
    "IsNaN": _numbers(lambda kind, x: f"{x} != {x}", result=BOOL),
    "IsInf": _floats(_is_inf),
    "LeakyRelu": _floats(lambda x, alpha=0.01, consumed_inputs=None: _leaky_relu(x, alpha)),
    "Elu": _floats(lambda x, alpha=1.0, consumed_inputs=None: _elu(x, alpha)),
    "Celu": _floats(lambda x, alpha=1.0: f"tl.where({x} > 0, {x}, {alpha!r} * (tl.exp({x} / {alpha!r}) - 1.0))"),
    "Selu": _floats(
        lambda x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875, consumed_inputs=None:
        f"{gamma!r} * tl.where({x} > 0, {x}, {alpha!r} * (tl.exp({x}) - 1.0))"
    ),
    "HardSigmoid": _floats(lambda x, alpha=0.2, beta=0.5, consumed_inputs=None: _hard_sigmoid(x, alpha, beta)),
    "Gelu": _floats(_gelu),
    "kiln::Activation": _activation,
}
