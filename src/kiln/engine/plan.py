"""The execution plan as stored in the manifest: lowered graphs with one chosen recipe per step.

A plan graph is ``{"name", "inputs", "outputs", "weights": {value: tensor key},
"release_unused_inputs", "steps": [...]}``; a step is ``{"name", "op", "domain", "opset",
"inputs", "outputs", "input_types", "output_types", "attributes", "recipe", "release"}`` where
the types are ONNX element type enums (0 when unknown) and graph attributes hold nested plan
graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.lowering import LoweredGraph, Step
from kiln.lowering.spec import KernelSpec

RecipeFor = Callable[[KernelSpec], dict[str, Any]]


def plan_graph(graph: LoweredGraph, recipe_for: RecipeFor) -> dict[str, Any]:
    return {
        "name": graph.name,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "weights": graph.weights,
        "release_unused_inputs": graph.release_unused_inputs,
        "steps": [_plan_step(step, recipe_for) for step in graph.steps],
    }


def _plan_step(step: Step, recipe_for: RecipeFor) -> dict[str, Any]:
    attributes = {}
    for name, encoded in step.attributes.items():
        if "graph" in encoded:
            encoded = {"graph": plan_graph(encoded["graph"], recipe_for)}
        elif "graphs" in encoded:
            encoded = {"graphs": [plan_graph(g, recipe_for) for g in encoded["graphs"]]}
        attributes[name] = encoded
    return {
        "name": step.name,
        "op": step.spec.op_type,
        "domain": step.spec.domain,
        "opset": step.spec.opset,
        "inputs": step.inputs,
        "outputs": step.outputs,
        "input_types": [t.dtype if t else 0 for t in step.spec.input_types],
        "output_types": [t.dtype if t else 0 for t in step.spec.output_types],
        "attributes": attributes,
        "recipe": recipe_for(step.spec),
        "release": step.release,
    }


def layer_info(
    step: Step, recipe: dict[str, Any], precision: str, ms: float | None = None
) -> dict[str, Any]:
    """What ``inspect`` shows of a top-level step (``ms``: the chosen kernel's timed cost)."""
    return {
        "name": step.name,
        "op": step.spec.op_type if not step.spec.domain else f"{step.spec.domain}::{step.spec.op_type}",
        "sources": step.sources,
        "source_ops": step.source_ops,
        "precision": precision,
        "choice": recipe["choice"],
        "timed_ms": None if ms is None else round(ms, 6),
    }
