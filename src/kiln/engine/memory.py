"""The static memory plan: every activation gets an offset in one arena, chosen from lifetimes.

An activation is a value a top-level step produces. It lives from the step that makes it to the
last step that reads it (a step that owns a subgraph — If, Loop, Scan — reads what its bodies read
from the enclosing graph); a graph output lives to the end of the run, since the caller receives
it. Its size is its element count times the itemsize of kiln's storage dtype (uint16 takes four
bytes, see ``kiln.ops.dtypes``), symbolic dimensions being substituted from ``symbols``.

Values whose size cannot be known before the run — an unknown or unsubstituted dimension, an
unknown rank, a sequence, an optional, a string tensor — are *dynamic*: they are listed, not
placed. The rest are placed at offsets aligned to :data:`ALIGNMENT` bytes so that no two values
alive at the same time overlap.

Every value is its own buffer: ops that may return views in PyTorch (Reshape, Flatten, Squeeze,
Unsqueeze, Identity) are not aliased to their input, which costs some arena but never lets a
write through one name change another.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sympy

from kiln.lowering import LoweredGraph, Step, ValueType
from kiln.lowering.lower import free_values
from kiln.ops.dtypes import ELEMENT_TYPES
from kiln.passes.shapes import parse_dim, symbol

ALIGNMENT = 256  # bytes; what CUDA's allocator guarantees, enough for any vectorised access

Lifetime = tuple[int, int]  # first and last step index, both inclusive


@dataclass(frozen=True)
class MemoryPlan:
    """Where each activation lives in the arena.

    ``offsets`` and ``sizes`` (bytes) hold the placed values; ``activation_bytes`` is the sum of
    their sizes, ``arena_bytes`` what the arena needs for all of them. ``lifetimes`` covers every
    activation, dynamic ones included; ``outputs`` names the activations that are graph outputs.
    """

    arena_bytes: int
    activation_bytes: int
    offsets: dict[str, int]
    sizes: dict[str, int]
    dynamic: list[str]
    lifetimes: dict[str, Lifetime]
    outputs: list[str]

    def peak_bytes(self) -> int:
        """The most bytes of placed values alive at one step: no arena can be smaller."""
        ends = [end for start, end in self.lifetimes.values()]
        live = [0] * (max(ends, default=-1) + 1)
        for name, size in self.sizes.items():
            start, end = self.lifetimes[name]
            for index in range(start, end + 1):
                live[index] += size
        return max(live, default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "arena_bytes": self.arena_bytes,
            "activation_bytes": self.activation_bytes,
            "values": {name: [self.offsets[name], size] for name, size in self.sizes.items()},
            "dynamic": list(self.dynamic),
            "outputs": list(self.outputs),
        }


def plan_memory(graph: LoweredGraph, symbols: Mapping[str, int]) -> MemoryPlan:
    """Lifetimes and sizes of ``graph``'s activations, placed in one arena.

    ``symbols`` gives values for named dimensions (``{"batch": 8, "seq": 128}``); a dimension
    naming a symbol without a value makes its value dynamic.
    """
    lifetimes, types = _lifetimes(graph)
    outputs = [name for name in lifetimes if name in set(graph.outputs)]
    substitution = {symbol(name): int(value) for name, value in symbols.items()}
    sizes: dict[str, int] = {}
    dynamic: list[str] = []
    for name, vtype in types.items():
        size = _size(vtype, substitution)
        if size is None:
            dynamic.append(name)
        else:
            sizes[name] = size
    offsets = _place(sizes, lifetimes)
    end = max((offsets[name] + size for name, size in sizes.items()), default=0)
    return MemoryPlan(
        arena_bytes=_align(end),
        activation_bytes=sum(sizes.values()),
        offsets={name: offsets[name] for name in sizes},
        sizes=sizes,
        dynamic=dynamic,
        lifetimes=lifetimes,
        outputs=outputs,
    )


def _lifetimes(graph: LoweredGraph) -> tuple[dict[str, Lifetime], dict[str, ValueType | None]]:
    """Each activation's lifetime and type, in the order the steps produce them."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    types: dict[str, ValueType | None] = {}
    for index, step in enumerate(graph.steps):
        for name in _reads(step):
            if name in first:
                last[name] = index
        for name, vtype in zip(step.outputs, step.spec.output_types, strict=True):
            if name:
                first[name] = last[name] = index
                types[name] = vtype
    end = len(graph.steps)
    for name in graph.outputs:
        if name in last:
            last[name] = end
    return {name: (first[name], last[name]) for name in first}, types


def _reads(step: Step) -> set[str]:
    reads = {name for name in step.inputs if name}
    for subgraph in _subgraphs(step):
        reads |= free_values(subgraph)
    return reads


def _subgraphs(step: Step) -> Iterator[LoweredGraph]:
    for encoded in step.attributes.values():
        yield from [encoded["graph"]] if "graph" in encoded else encoded.get("graphs", [])


def _size(vtype: ValueType | None, substitution: dict[sympy.Symbol, int]) -> int | None:
    """Bytes of a tensor of ``vtype``; None when that is not known before the run."""
    if vtype is None or vtype.kind != "tensor" or vtype.shape is None:
        return None
    element = ELEMENT_TYPES.get(vtype.dtype)
    if element is None or element.torch is None:  # unknown dtype, or strings
        return None
    count = 1
    for dim in vtype.shape:
        if dim is None:
            return None
        if isinstance(dim, str):
            value = parse_dim(dim).subs(substitution)
            if not value.is_Integer:
                return None
            dim = int(value)
        count *= max(dim, 0)
    return count * element.torch.itemsize


def _place(sizes: dict[str, int], lifetimes: dict[str, Lifetime]) -> dict[str, int]:
    """Offsets by the greedy-by-size heuristic (Pisarchyk & Lee 2020, as in TFLite and ONNX Runtime).

    Largest value first, each at the lowest aligned offset where it overlaps no value already
    placed whose lifetime overlaps its own.
    """
    order = sorted(sizes, key=lambda name: (-sizes[name], lifetimes[name][0], name))
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last step), by offset
    offsets: dict[str, int] = {}
    for name in order:
        size, (start, stop) = sizes[name], lifetimes[name]
        offset = 0
        for other_offset, other_end, other_start, other_stop in placed:
            if other_start > stop or start > other_stop:
                continue  # never alive together
            if offset + size <= other_offset:
                break  # the gap below this one holds it
            offset = max(offset, _align(other_end))
        offsets[name] = offset
        bisect.insort(placed, (offset, offset + size, start, stop))
    return offsets


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT
