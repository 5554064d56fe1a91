"""The passes of each optimization level, explicitly and in order.

0: cleanup only (inline functions, remove dead nodes, sort) — no simplification, no fusion, so a
   wrong fusion can be found by bisecting levels.
1: + simplification (constant folding through ``ops``, no-op removal, common subexpressions,
   shape arithmetic), then sequence splits indexed at constant positions as plain Splits.
2: + local fusions (BatchNorm folding, GELU/SiLU/HardSwish, LayerNorm/RMSNorm).
3: + epilogue fusions (Conv/Gemm/MatMul with bias, activation, residual), attention, and
   pointwise grouping. The default.
4, 5: as 3 for now; reserved for fusions that trade build time for speed.

Under a reduced precision policy (fp16, bf16) every level ends with :class:`ReducePrecision`
(after shape inference at level 0, which has none of its own: the pass reads value types).
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
from kiln.passes.fuse_conv import fuse_conv
from kiln.passes.fuse_matmul import fuse_matmul
from kiln.passes.fuse_norm import fuse_norm
from kiln.passes.fuse_pointwise import group_pointwise
from kiln.passes.precision import REDUCED_TYPES, ReducePrecision
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
    opt_level: int, precision: str = "fp32", pinned: Mapping[str, str] | None = None
) -> list[GraphPass]:
    """Fresh instances of the passes of ``opt_level`` and ``precision``, in order; ``pinned``
    names the layers kept in fp32."""
    passes = cleanup()
    if opt_level >= 1:
        passes += simplify()  # shapes first: folding and the fusions' checks read them
        passes.append(split_sequence())  # after folding: sizes and positions are constants
    if opt_level >= 2:
        passes += [fold_batchnorm(), fuse_activations(), fuse_norm()]
    if opt_level >= 3:
        passes += [fuse_attention(), fuse_matmul(), fuse_conv(), group_pointwise()]
    if opt_level >= 1:
        passes += cleanup()  # what the rewrites left behind: replaced weights, shape glue
    if precision in REDUCED_TYPES:
        if opt_level == 0:
            passes.append(InferShapes())
        passes.append(ReducePrecision(precision, pinned))
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
    model: ir.Model, opt_level: int, precision: str = "fp32", pinned: Mapping[str, str] | None = None
) -> tuple[ir.Model, list[PassRecord]]:
    """Run the passes of ``opt_level`` and ``precision`` on ``model``; return the result and a
    record per pass."""
    records = []
    for graph_pass in passes_for(opt_level, precision, pinned):
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
