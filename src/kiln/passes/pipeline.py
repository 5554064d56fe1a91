"""The passes of each optimization level, explicitly and in order.

Level 0 only cleans up: model-local functions are inlined, dead nodes and unused functions and
opsets removed, nodes sorted. Higher levels add simplification and fusion passes as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common

from kiln.errors import ModelError


def passes_for(opt_level: int) -> list[ir.passes.PassBase]:
    """Fresh instances of the passes of ``opt_level``, in order."""
    cleanup = [
        common.InlinePass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.TopologicalSortPass(),
    ]
    return cleanup


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, whether it changed the graph, node counts and time."""

    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def optimize(model: ir.Model, opt_level: int) -> tuple[ir.Model, list[PassRecord]]:
    """Run the passes of ``opt_level`` on ``model``; return the result and a record per pass."""
    records = []
    for graph_pass in passes_for(opt_level):
        before = _count_nodes(model)
        start = time.perf_counter()
        try:
            result = graph_pass(model)
        except ir.passes.PassError as error:
            raise ModelError(f"{type(graph_pass).__name__} failed on the model: {error}") from None
        model = result.model
        records.append(
            PassRecord(
                name=type(graph_pass).__name__,
                modified=result.modified,
                nodes_before=before,
                nodes_after=_count_nodes(model),
                seconds=time.perf_counter() - start,
            )
        )
    return model, records
