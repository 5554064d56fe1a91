"""The passes of each optimization level, explicitly and in order.

0: cleanup only (inline functions, remove dead nodes, sort) — no simplification, no fusion, so a
   wrong fusion can be found by bisecting levels.
1: + simplification (constant folding through ``ops``, no-op removal, common subexpressions,
   shape arithmetic), then sequence splits indexed at constant positions as plain Splits.
2: + local fusions (BatchNorm folding, GELU/SiLU/HardSwish, LayerNorm/RMSNorm).
3: + epilogue fusions (Conv/Gemm/MatMul with bias, activation, residual), attention, sibling
   products merged (Q/K/V projections), and pointwise grouping. The default.
4, 5: as 3 for now; reserved for fusions that trade build time for speed.

From level 1, the model's own QuantizeLinear/DequantizeLinear pairs are read into scales first
(:class:`ReadQuantization`; at level 0 they run as the ops they are). After the fusions,
:class:`QuantizeLayers` quantizes the layers that have scales: the model's, or under the int8
and fp8 policies those ``calibrate`` measures. Under a reduced precision policy (fp16, bf16;
``rest_precision`` for the layers int8/fp8 left in float) every level ends with
:class:`ReducePrecision` (after shape inference at level 0, which has none of its own: the pass
reads value types). Last, :class:`HandOffQuantized` lets quantized layers pass their outputs
quantized to the quantized layers that alone read them, and :class:`NormsQuantizeRows` lets
norms quantize the rows the matrix products after them read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes import common

from kiln.errors import ModelError
from kiln.passes.base import GraphPass, IrPass
from kiln.passes.fold_batchnorm import fold_batchnorm
from kiln.passes.fuse_activations import fuse_activations
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.fuse_mha import fuse_mha
from kiln.passes.fuse_conv import fuse_conv
from kiln.passes.fuse_matmul import fuse_matmul
from kiln.passes.fuse_norm import fuse_norm
from kiln.passes.fuse_pointwise import group_pointwise
from kiln.passes.merge_products import MergeSiblingProducts
from kiln.passes.precision import REDUCED_TYPES, ReducePrecision
from kiln.passes.quantize import FORMATS, Calibrate, QuantizeLayers, ReadQuantization
from kiln.passes.quantized_handoff import HandOffQuantized
from kiln.passes.quantized_norm import NormsQuantizeRows
from kiln.passes.shapes import InferShapes
from kiln.passes.simplify import simplify
from kiln.passes.split_sequence import split_sequence


def cleanup() -> list[GraphPass]:
    return [
        IrPass(common.InlinePass()),
        IrPass(common.RemoveUnusedNodesPass()),
        IrPass(common.RemoveUnusedFunctionsPass()),
        IrPass(common.RemoveUnusedOpsetsPass()),
        IrPass(common.TopologicalSortPass()),
    ]


def passes_for(
    opt_level: int, precision: str = "fp32", pinned: Mapping[str, str] | None = None,
    calibrate: Calibrate | None = None, rest_precision: str = "fp32", float_outputs: bool = False,
) -> list[GraphPass]:
    """Fresh instances of the passes of ``opt_level`` and ``precision``, in order; ``pinned``
    maps the layers kept from the policy to ``"fp32"`` or (unquantized in an int8/fp8 build)
    ``"fp16"``; ``calibrate`` measures activation ranges for int8/fp8;
    ``rest_precision`` is what int8/fp8 builds run their unquantized layers in;
    ``float_outputs`` keeps every layer's output in float (no quantized hand-off), for builds
    that expose them all."""
    passes = cleanup()
    if opt_level >= 1:
        passes.append(ReadQuantization())  # before folding turns the weights' DQs into floats
        passes += simplify()  # shapes first: folding and the fusions' checks read them
        passes.append(split_sequence())  # after folding: sizes and positions are constants
    if opt_level >= 2:
        passes += [fold_batchnorm(), fuse_activations(), fuse_norm()]
    if opt_level >= 3:
        passes += [fuse_attention(), fuse_mha(), fuse_matmul(), fuse_conv(),
                   MergeSiblingProducts(pinned or ()), group_pointwise()]
    if opt_level >= 1:
        passes += cleanup()  # what the rewrites left behind: replaced weights, shape glue
    if opt_level == 0 and (precision in REDUCED_TYPES or precision in FORMATS):
        passes.append(InferShapes())
    if opt_level >= 1 or precision in FORMATS:
        fmt = precision if precision in FORMATS else None
        passes.append(QuantizeLayers(fmt, calibrate, frozenset(pinned or ())))
    reduced = precision if precision in REDUCED_TYPES else rest_precision if precision in FORMATS else None
    if reduced in REDUCED_TYPES:  # fp16 pins only keep layers from quantization
        kept_fp32 = [name for name, kept in (pinned or {}).items() if kept == "fp32"]
        passes.append(ReducePrecision(reduced, kept_fp32))
    if (opt_level >= 1 or precision in FORMATS) and not float_outputs:
        passes += [HandOffQuantized(), NormsQuantizeRows()]
    return passes


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: node counts before and after, matches per rule, and its time."""

    name: str
    nodes_before: int
    nodes_after: int
    changes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def optimize(
    model: ir.Model, opt_level: int, precision: str = "fp32", pinned: Mapping[str, str] | None = None,
    calibrate: Calibrate | None = None, rest_precision: str = "fp32", float_outputs: bool = False,
) -> tuple[ir.Model, list[PassRecord]]:
    """Run the passes of ``opt_level`` and ``precision`` (see :func:`passes_for`) on ``model``;
    return the result and a record per pass."""
    records = []
    for graph_pass in passes_for(opt_level, precision, pinned, calibrate, rest_precision, float_outputs):
        before = count_nodes(model)
        start = time.perf_counter()
        try:
            outcome = graph_pass(model)
        except ir.passes.PassError as error:
            raise ModelError(f"{graph_pass.name} failed on the model: {error}") from None
        model = outcome.model
        records.append(
            PassRecord(
                name=graph_pass.name,
                nodes_before=before,
                nodes_after=count_nodes(model),
                changes=dict(outcome.changes),
                seconds=round(time.perf_counter() - start, 4),
            )
        )
    return model, records
