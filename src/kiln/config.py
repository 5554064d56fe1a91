"""Build options: the one place they live. Nothing below this module reads environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kiln.errors import ConfigError

DEVICES = ("cpu", "cuda")
OPT_LEVELS = range(0, 6)
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "fp8")
BEST = "best"  # the policy that picks the fastest precision meeting an accuracy budget
POLICIES = (*PRECISIONS, BEST)
REDUCED_PRECISIONS = ("fp16", "bf16")
QUANTIZED_PRECISIONS = ("int8", "fp8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
LAYER_PRECISIONS = ("fp32", "fp16")  # what a layer may be pinned to
# fp16 pins keep a layer of an int8/fp8 build unquantized (fp16 is what those builds run their
# float layers in on a GPU); under the fp16 policy they change nothing
FP16_PIN_POLICIES = (*QUANTIZED_PRECISIONS, "fp16")
PROFILE_POINTS = ("min", "opt", "max")

Shape = tuple[int, ...]
# An input's shape as a model declares it: ints (static), names (symbolic) or None (unknown)
# per dimension, or None where even the rank is unknown.
DeclaredShape = tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class Profile:
    """An optimization profile: the range of shapes an engine accepts, per input.

    ``shapes`` maps an input name to its ``(min, opt, max)`` shapes, each a tuple of ints; a
    single shape means min = opt = max. ``Profile({"ids": ((1, 16), (8, 128), (64, 512))})``
    accepts ``ids`` from 1x16 to 64x512 in every dimension and tunes kernels for 8x128. Inputs
    it does not name keep the shapes the model declares. The build checks the names and ranks
    against the model (see :meth:`dims`); a shape set fits the profile when every named input
    lies within its range, dimension by dimension.
    """

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, Mapping) or not self.shapes:
            raise ConfigError(
                "a profile maps input names to (min, opt, max) shapes, e.g. "
                "Profile({'ids': ((1, 16), (8, 128), (64, 512))})"
            )
        shapes = {}
        for name, given in self.shapes.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"profile input names must be non-empty strings, not {name!r}")
            shapes[name] = _profile_range(name, given)
        object.__setattr__(self, "shapes", shapes)

    def __hash__(self) -> int:
        return hash(tuple(self.shapes.items()))

    def dims(self, signature: Mapping[str, DeclaredShape], which: str = "opt") -> dict[str, int]:
        """The value of every symbolic dimension at ``which`` (``"min"``, ``"opt"`` or ``"max"``).

        ``signature`` maps each model input to its declared shape. Raises :class:`ConfigError`
        when the profile names an input the model lacks, gives a shape of another rank, sizes a
        static dimension otherwise than the model, or gives one symbol two values.
        """
        if which not in PROFILE_POINTS:
            raise ConfigError(f"which must be one of {', '.join(PROFILE_POINTS)}, not {which!r}")
        point = PROFILE_POINTS.index(which)
        symbols: dict[str, tuple[Shape, str]] = {}  # symbol -> its sizes at min/opt/max, and where
        for name, shapes in self.shapes.items():
            if name not in signature:
                known = ", ".join(signature) or "none"
                raise ConfigError(
                    f"optimization profile names unknown input {name!r}; the model's inputs are: {known}"
                )
            declared = signature[name]
            if declared is None:
                continue  # rank unknown: the profile says what it is
            if len(shapes[0]) != len(declared):
                raise ConfigError(
                    f"optimization profile gives input {name!r} rank {len(shapes[0])} "
                    f"({format_shape(shapes[0])}), the model declares rank {len(declared)} "
                    f"({format_shape(declared)})"
                )
            for axis, dim in enumerate(declared):
                sizes = tuple(shape[axis] for shape in shapes)
                if isinstance(dim, int) and sizes != (dim, dim, dim):
                    raise ConfigError(
                        f"optimization profile gives input {name!r} sizes {_span(sizes)} in "
                        f"dimension {axis}, which the model fixes at {dim} ({format_shape(declared)})"
                    )
                if isinstance(dim, str):
                    first = symbols.setdefault(dim, (sizes, name))
                    if first[0] != sizes:
                        raise ConfigError(
                            f"optimization profile gives dimension {dim!r} sizes {_span(first[0])} "
                            f"in input {first[1]!r} but {_span(sizes)} in input {name!r}; a "
                            "symbol has one range"
                        )
        return {symbol: sizes[point] for symbol, (sizes, _) in symbols.items()}

    def fits(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether every input this profile names has a shape within its range in ``shapes``."""
        for name, (low, _, high) in self.shapes.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(low):
                return False
            if not all(lo <= size <= hi for lo, size, hi in zip(low, shape, high)):
                return False
        return True

    def describe(self) -> str:
        """The ranges, as ``"ids 1x16..64x512, mask 8x128"``."""
        return ", ".join(
            f"{name} {format_shape(low)}" + ("" if low == high else f"..{format_shape(high)}")
            for name, (low, _, high) in self.shapes.items()
        )

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        """``{input: {"min": [...], "opt": [...], "max": [...]}}``, as engine manifests hold it."""
        return {
            name: {point: list(shape) for point, shape in zip(PROFILE_POINTS, shapes)}
            for name, shapes in self.shapes.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, list[int]]]) -> Profile:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a stored profile is a mapping of input name to ranges, not {data!r}")
        return cls({name: _points(name, ranges) for name, ranges in data.items()})


def format_shape(shape: DeclaredShape) -> str:
    """``(1, 16)`` -> ``"1x16"``; unknown dimensions as ``?``, a scalar as ``[]``."""
    if shape is None:
        return "?"
    return "x".join("?" if dim is None else str(dim) for dim in shape) or "[]"


def _span(sizes: Shape) -> str:
    low, opt, high = sizes
    return str(low) if low == high else f"{low}..{high} (opt {opt})"


def _points(name: str, ranges: object) -> tuple[object, object, object]:
    if not isinstance(ranges, Mapping) or set(ranges) != set(PROFILE_POINTS):
        raise ConfigError(f"profile input {name!r}: expected min, opt and max shapes, not {ranges!r}")
    return tuple(ranges[point] for point in PROFILE_POINTS)  # type: ignore[return-value]


def _is_dim(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _profile_range(name: str, given: object) -> tuple[Shape, Shape, Shape]:
    """``(min, opt, max)`` from three shapes, or from one shape (min = opt = max); checked."""
    usage = (
        f"profile input {name!r} takes a shape of positive ints or three of them (min, opt, max), "
        f"not {given!r}"
    )
    if not isinstance(given, (tuple, list)):
        raise ConfigError(usage)
    if all(_is_dim(dim) for dim in given):
        shapes = (tuple(given),) * 3
    elif len(given) == 3 and all(
        isinstance(shape, (tuple, list)) and all(_is_dim(dim) for dim in shape) for shape in given
    ):
        shapes = tuple(tuple(shape) for shape in given)
    else:
        raise ConfigError(usage)
    low, opt, high = shapes
    if not len(low) == len(opt) == len(high):
        raise ConfigError(
            f"profile input {name!r}: min, opt and max must have the same rank, not "
            f"{format_shape(low)}, {format_shape(opt)} and {format_shape(high)}"
        )
    if any(dim < 1 for dim in low) or not all(
        lo <= mid <= hi for lo, mid, hi in zip(low, opt, high)
    ):
        raise ConfigError(
            f"profile input {name!r}: every dimension needs 1 <= min <= opt <= max, not min "
            f"{format_shape(low)}, opt {format_shape(opt)}, max {format_shape(high)}"
        )
    return shapes  # type: ignore[return-value]



# What an accuracy budget may bound: metric -> (its comparison, the bounds it takes). Each is
# measured against FP32 over every output and sample (see ``kiln.runtime.accuracy``):
# cosine: the worst sample's cosine similarity; top1: the share of samples whose top class agrees
# (outputs shaped [batch, classes]); max_abs, max_rel: the largest absolute and relative errors.
BUDGET_METRICS = {
    "cosine": (">=", (-1.0, 1.0)),
    "top1": (">=", (0.0, 1.0)),
    "max_abs": ("<=", (0.0, math.inf)),
    "max_rel": ("<=", (0.0, math.inf)),
}
_BUDGET_FORMS = ", ".join(f"{metric}{op}X" for metric, (op, _) in BUDGET_METRICS.items())
_BUDGET_TERM = re.compile(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*(>=|<=)\s*(\S+)\s*")


@dataclass(frozen=True)
class BudgetTerm:
    """One bound of an accuracy budget: ``metric`` (a key of :data:`BUDGET_METRICS`) at least or
    at most ``bound``, as the metric's comparison says."""

    metric: str
    bound: float

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise ConfigError(
                f"accuracy budget names unknown metric {self.metric!r}; a budget is one or more "
                f"of {_BUDGET_FORMS}, joined by commas"
            )
        low, high = BUDGET_METRICS[self.metric][1]
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)) or not (
            low <= self.bound <= high and math.isfinite(self.bound)
        ):
            span = f"from {low:g} to {high:g}" if math.isfinite(high) else f"a finite number >= {low:g}"
            raise ConfigError(f"accuracy budget: {self.metric} takes {span}, not {self.bound!r}")
        object.__setattr__(self, "bound", float(self.bound))

    @property
    def comparison(self) -> str:
        return BUDGET_METRICS[self.metric][0]

    def holds(self, value: float) -> bool:
        """Whether ``value`` of the metric is within the bound (NaN never is)."""
        return value >= self.bound if self.comparison == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.bound!r}"


@dataclass(frozen=True)
class AccuracyBudget:
    """How close to FP32 an engine must stay: bounds that must all hold.

    Written ``"cosine>=0.999"`` or ``"cosine>=0.999,top1>=0.99"``: one or more of ``cosine>=X``,
    ``top1>=X``, ``max_abs<=X`` and ``max_rel<=X`` (see :data:`BUDGET_METRICS`), each metric at
    most once, joined by commas. :meth:`parse` reads that text; ``str()`` writes it back.
    """

    terms: tuple[BudgetTerm, ...]

    def __post_init__(self) -> None:
        terms = tuple(self.terms) if isinstance(self.terms, (tuple, list)) else ()
        if not terms or not all(isinstance(term, BudgetTerm) for term in terms):
            raise ConfigError(
                f"an accuracy budget needs one or more of {_BUDGET_FORMS}, joined by commas"
            )
        metrics = [term.metric for term in terms]
        repeated = sorted({metric for metric in metrics if metrics.count(metric) > 1})
        if repeated:
            raise ConfigError(f"accuracy budget bounds {', '.join(repeated)} more than once")
        object.__setattr__(self, "terms", terms)

    @classmethod
    def parse(cls, text: str) -> AccuracyBudget:
        """``"cosine>=0.999,top1>=0.99"`` -> an :class:`AccuracyBudget`; :class:`ConfigError`
        naming the part that is wrong otherwise."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"an accuracy budget is one or more of {_BUDGET_FORMS}, joined by commas, "
                f"not {text!r}"
            )
        terms = []
        for part in text.split(","):
            match = _BUDGET_TERM.fullmatch(part)
            if match is None:
                raise ConfigError(
                    f"accuracy budget {text!r}: {part.strip()!r} is not METRIC>=X or METRIC<=X; "
                    f"the terms are {_BUDGET_FORMS}"
                )
            metric, comparison, number = match.groups()
            if metric in BUDGET_METRICS and comparison != BUDGET_METRICS[metric][0]:
                wanted = BUDGET_METRICS[metric][0]
                kind = "a lower" if wanted == ">=" else "an upper"
                raise ConfigError(
                    f"accuracy budget {text!r}: {metric} takes {kind} bound, {metric}{wanted}X"
                )
            try:
                bound = float(number)
            except ValueError:
                raise ConfigError(
                    f"accuracy budget {text!r}: {number!r} is not a number"
                ) from None
            terms.append(BudgetTerm(metric, bound))
        return cls(tuple(terms))

    def holds(self, values: Mapping[str, float]) -> bool:
        """Whether every bound holds for ``values`` (metric -> measured value)."""
        return all(term.holds(values[term.metric]) for term in self.terms)

    def __str__(self) -> str:
        return ",".join(str(term) for term in self.terms)


@dataclass(frozen=True)
class BuildConfig:
    """How to build an engine.

    device: ``"cpu"`` or ``"cuda"``; ``None`` picks cuda when a GPU is visible, else cpu.
    opt_level: 0 (cleanup only) to 5; 3 is the default.
    debug_outputs: also expose every top-level layer's outputs as engine outputs, named as the
        ONNX values they replace, so ``kiln compare --layerwise`` can find the first layer that
        diverges. Costs memory: no intermediate value is released.
    precision: ``"fp32"`` (strict, the default), ``"tf32"`` (fp32 layers may use TF32 tensor
        cores), ``"fp16"`` or ``"bf16"`` (layers computing in float32 run in the reduced type,
        but for those that need fp32's range; see :mod:`kiln.passes.precision`), ``"int8"`` or
        ``"fp8"`` (E4M3; convolutions and matrix products quantized with calibrated scales, the
        other layers in fp16 on a GPU and fp32 on the CPU; see :mod:`kiln.passes.quantize`), or
        ``"best"``: the fastest precision whose engine meets ``accuracy_budget`` (which it
        needs; see :mod:`kiln.precision_search`). Under fp16, layers whose activations exceed
        fp16's range on the calibration data, when given, stay fp32. Models carrying
        QuantizeLinear/DequantizeLinear pairs are quantized as they say under every policy.
    accuracy_budget: how close to FP32 the engine must stay, an :class:`AccuracyBudget` or its
        text (``"cosine>=0.999"``, ``"cosine>=0.999,top1>=0.99"``). The engine is measured
        against the FP32 model in ONNX Runtime on the calibration data (else on random inputs),
        and the layers that lose the most accuracy are kept in fp32 until the budget holds; when
        no choice of layers meets it, the build fails saying how close it came. ``None``: no
        budget, nothing measured.
    layer_precisions: layer name (as ``kiln inspect`` shows it) -> ``"fp32"``, to keep that
        layer in fp32 under a reduced policy, or ``"fp16"``, to keep a layer of an int8/fp8 build
        unquantized (in fp16 on a GPU; in fp32 on the CPU, where such builds run their float
        layers in fp32). Unknown names fail the build.
    profiles: optimization profiles (:class:`Profile`), one or several; a single one, or a mapping
        of input name to shapes, is taken as a one-profile list. When any are given, every input
        with a symbolic or unknown dimension must be in each, the engine accepts the shapes that
        fit one of them, and kernels are tuned at the first one's ``opt`` shapes.
    timing_cache: path of a persistent kernel timing cache reused across builds: a JSON file of
        measured kernel timings, read and updated by builds. ``None`` keeps no cache.
    calibration_method: how int8/fp8 calibration turns observed activations into ranges:
        ``"entropy"`` (the threshold minimizing the KL divergence, the default), ``"percentile"``
        or ``"minmax"``.
    calibration_percentile: the percentile of ``|x|`` the ``"percentile"`` method keeps.
    calibration_cache: path of a JSON file of calibrated ranges, written after calibrating and
        reused by later builds of the same model and method (which then need no data).
    calibration_batches: use at most this many batches of the calibration data.
    fp16_fallback: int8/fp8 builds on a GPU at ``opt_level`` 3 and above keep in fp16 the
        quantized layers that run faster there, when that makes the engine faster (see
        :mod:`kiln.fp16_fallback`); False keeps every layer the policy quantizes in 8 bits.
    """

    device: str | None = None
    opt_level: int = 3
    debug_outputs: bool = False
    precision: str = "fp32"
    accuracy_budget: AccuracyBudget | str | None = None
    layer_precisions: dict[str, str] = field(default_factory=dict)
    profiles: tuple[Profile, ...] = ()
    timing_cache: str | None = None
    calibration_method: str = "entropy"
    calibration_percentile: float = 99.99
    calibration_cache: str | None = None
    calibration_batches: int | None = None
    fp16_fallback: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", _profiles(self.profiles))
        for option in ("timing_cache", "calibration_cache"):
            path = getattr(self, option)
            if path is not None:
                if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                    raise ConfigError(f"{option} must be a file path, not {path!r}")
                object.__setattr__(self, option, os.fspath(path))
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}, "
                f"not {self.calibration_method!r}"
            )
        if not isinstance(self.calibration_percentile, (int, float)) or not (
            0 < self.calibration_percentile <= 100
        ):
            raise ConfigError(
                f"calibration_percentile must be in (0, 100], not {self.calibration_percentile!r}"
            )
        if self.calibration_batches is not None and (
            not isinstance(self.calibration_batches, int) or self.calibration_batches < 1
        ):
            raise ConfigError(
                f"calibration_batches must be a positive integer, not {self.calibration_batches!r}"
            )
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"opt_level must be an integer from 0 to 5, not {self.opt_level!r}")
        if self.precision not in POLICIES:
            raise ConfigError(
                f"precision must be one of {', '.join(POLICIES)}, not {self.precision!r}"
            )
        if isinstance(self.accuracy_budget, str):
            object.__setattr__(self, "accuracy_budget", AccuracyBudget.parse(self.accuracy_budget))
        elif self.accuracy_budget is not None and not isinstance(self.accuracy_budget, AccuracyBudget):
            raise ConfigError(
                "accuracy_budget must be an AccuracyBudget or its text, such as 'cosine>=0.999', "
                f"not {type(self.accuracy_budget).__name__}"
            )
        if self.precision == BEST and self.accuracy_budget is None:
            raise ConfigError(
                "precision 'best' picks the fastest precision that meets an accuracy budget: give "
                "one, e.g. accuracy_budget='cosine>=0.999' (--accuracy-budget on the command line)"
            )
        if not isinstance(self.layer_precisions, dict):
            raise ConfigError("layer_precisions must be a dict of layer name to precision")
        for layer, precision in self.layer_precisions.items():
            if precision not in LAYER_PRECISIONS:
                raise ConfigError(
                    f"layer {layer!r} can be pinned to {', '.join(LAYER_PRECISIONS)} only, "
                    f"not {precision!r}"
                )
            if precision == "fp16" and self.precision not in FP16_PIN_POLICIES:
                raise ConfigError(
                    f"layer {layer!r} can be pinned to fp16 under the {', '.join(FP16_PIN_POLICIES)} "
                    f"policies only (it keeps a layer unquantized), not under {self.precision!r}"
                )

    def replace(self, **overrides: object) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown build option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)


def _profiles(given: object) -> tuple[Profile, ...]:
    """``profiles`` as a tuple of :class:`Profile`: from one, a mapping, or a list of either."""
    if given is None:
        return ()
    if isinstance(given, (Profile, Mapping)):
        given = [given]
    if not isinstance(given, (tuple, list)):
        raise ConfigError(f"profiles must be a Profile or a list of them, not {type(given).__name__}")
    return tuple(p if isinstance(p, Profile) else Profile(p) for p in given)
