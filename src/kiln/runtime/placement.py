"""Which values of a plan graph live in host memory when the engine runs on a GPU.

Shape arithmetic (a Reshape's target, Slice bounds, Shape -> Gather -> Concat chains) is read on
the host by the ops that consume it. Kept on the GPU, every such read would synchronise the device
and make the run impossible to capture in a CUDA graph. So a value lives on the host when every
reader takes it there: an op input declared in ``OpImpl.host_inputs``, or a *host step* — a step
whose inputs all live on the host, which then runs on the CPU too. Candidates are small weights
and every step's outputs (Shape and Size read only metadata, so theirs qualify whatever their
input's device); the largest set meeting those conditions is found by removing violators until
none is left. Graph outputs and values read by subgraphs stay on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ops.registry import OpImpl

# Weights above this many elements are data, not shape arithmetic.
MAX_HOST_WEIGHT_ELEMENTS = 1024


@dataclass(frozen=True)
class Placement:
    host_values: frozenset[str]
    host_steps: frozenset[int]  # step indices that run on the CPU


def place(
    steps: Sequence[dict[str, Any]], impls: Sequence[OpImpl], weights: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
) -> Placement:
    """``weights`` maps the graph's weight value names to their tensors (any device)."""
    readers: dict[str, list[tuple[int, int | None]]] = {}
    for index, step in enumerate(steps):
        for slot, name in enumerate(step["inputs"]):
            if name:
                readers.setdefault(name, []).append((index, slot))
        for name in _subgraph_reads(step):
            readers.setdefault(name, []).append((index, None))

    host = {
        name for name, tensor in weights.items()
        if isinstance(tensor, torch.Tensor) and tensor.numel() <= MAX_HOST_WEIGHT_ELEMENTS
    }
    host.update(name for step in steps for name in step["outputs"] if name)
    host.difference_update(outputs)

    def runs_on_host(index: int) -> bool:
        step, impl = steps[index], impls[index]
        if impl.metadata_only:
            return all(name in host for name in step["outputs"] if name)
        inputs = [name for name in step["inputs"] if name]
        return (
            bool(inputs) and not _has_subgraphs(step)
            and all(name in host for name in inputs)
            and all(name in host for name in step["outputs"] if name)
        )

    changed = True
    while changed:
        changed = False
        for index, step in enumerate(steps):
            if impls[index].metadata_only or runs_on_host(index):
                continue
            made = {name for name in step["outputs"] if name} & host
            if made:
                host -= made
                changed = True
        for name in list(host):
            for index, slot in readers.get(name, []):
                if slot in impls[index].host_inputs or runs_on_host(index):
                    continue
                host.discard(name)
                changed = True
                break
    host_steps = frozenset(i for i in range(len(steps)) if runs_on_host(i))
    return Placement(frozenset(host), host_steps)


def _has_subgraphs(step: dict[str, Any]) -> bool:
    return any("graph" in e or "graphs" in e for e in step["attributes"].values())


def _subgraph_reads(step: dict[str, Any]) -> set[str]:
    """Names a step's subgraphs read from the enclosing scope (all of them, conservatively)."""
    names: set[str] = set()
    for encoded in step["attributes"].values():
        for graph in [encoded["graph"]] if "graph" in encoded else encoded.get("graphs", []):
            names |= _graph_reads(graph)
    return names


def _graph_reads(graph: dict[str, Any]) -> set[str]:
    names = set(graph["outputs"])
    for step in graph["steps"]:
        names.update(name for name in step["inputs"] if name)
        names |= _subgraph_reads(step)
    return names
