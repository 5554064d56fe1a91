"""CUDA graphs: capture a program's launches once per input-shape signature, then replay them.

A replay costs one launch instead of one per kernel, which is most of the time of a small batch.
The first run of a signature runs eagerly (it warms up library heuristics and lazy
initialisation); the second captures into static input buffers and replays; later runs copy their
inputs into those buffers and replay. A program that cannot be captured for a signature (a layer
reads device data on the host, as NonZero must) runs eagerly for that signature from then on,
with one log warning. Graphs share one memory pool per execution context: its runs are serial,
and outputs are copied out of the pool before a run returns. At most ``capacity`` signatures are
kept, the least recently used dropped first.

Several execution contexts capture on several threads at once (a server's instances): so a
capture runs on the context's own capture stream, waits only for the caller's stream, and makes no
device-wide call (``torch.cuda.graph`` synchronizes the whole device and empties the allocator's
cache, which another thread's capture in progress does not permit).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("kiln.runtime")

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
# One capture at a time in the process: the allocator routes each capture's allocations to its
# pool by stream, and keeping captures apart leaves nothing to that routing's corner cases.
_CAPTURE_LOCK = threading.Lock()
DEFAULT_GRAPH_CAPACITY = 16


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: list[Any]


def signature_of(inputs: Mapping[str, Any]) -> Signature | None:
    """The shapes and types of ``inputs``; ``None`` when one is not a plain tensor."""
    if not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return None
    return tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items())


class GraphCache:
    def __init__(self, capacity: int = DEFAULT_GRAPH_CAPACITY) -> None:
        self.capacity = capacity
        self._pool = torch.cuda.graph_pool_handle()
        self._capture_stream = torch.cuda.Stream()
        self._graphs: OrderedDict[Signature, _Captured | None] = OrderedDict()
        self._seen: set[Signature] = set()

    @property
    def captured(self) -> int:
        """How many input signatures replay from a CUDA graph."""
        return sum(1 for captured in self._graphs.values() if captured is not None)

    def run(
        self, key: Signature, inputs: dict[str, torch.Tensor],
        program: Callable[[dict[str, torch.Tensor]], list[Any]],
    ) -> tuple[list[Any], bool]:
        """Run ``program`` on ``inputs``; say whether the outputs are the graph's static buffers."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            captured = self._graphs[key]
            if captured is None:
                return program(inputs), False
            return self._replay(captured, inputs), True
        if key not in self._seen:
            self._seen.add(key)
            return program(inputs), False
        captured = self._capture(key, inputs, program)
        self._graphs[key] = captured
        if len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        if captured is None:
            return program(inputs), False
        return self._replay(captured, inputs), True

    def _capture(
        self, key: Signature, inputs: dict[str, torch.Tensor],
        program: Callable[[dict[str, torch.Tensor]], list[Any]],
    ) -> _Captured | None:
        static = {name: value.clone() for name, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream()
        self._capture_stream.wait_stream(caller)
        with _CAPTURE_LOCK, torch.cuda.stream(self._capture_stream):
            try:
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    outputs = program(static)
                finally:
                    graph.capture_end()
            except Exception as error:  # noqa: BLE001  (any failure: run this signature eagerly)
                self._capture_stream.synchronize()
                shapes = ", ".join(f"{n}{list(s)}" for n, s, _ in key)
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                log.warning("inputs %s run without a CUDA graph: capture failed (%s)", shapes, reason)
                return None
        caller.wait_stream(self._capture_stream)
        return _Captured(graph, static, outputs)

    @staticmethod
    def _replay(captured: _Captured, inputs: dict[str, torch.Tensor]) -> list[Any]:
        for name, value in inputs.items():
            captured.inputs[name].copy_(value)
        captured.graph.replay()
        return captured.outputs
