"""Timing engine runs: phases (host to device, compute, device to host) and, optionally, layers.

A :class:`Timeline` collects marks; each mark ends the span named after it. ``Engine.run`` marks
the start of a run and the end of each phase; with ``layers=True`` the program also marks the end
of each top-level layer by its name, inside the compute phase. On cuda a mark records a CUDA event
on the current stream (read after one synchronize, in :meth:`Timeline.runs`); on cpu it reads
``perf_counter``. The host clock is read at every mark too: on cuda the host time of the compute
phase is the enqueue time, since kernel launches return before the kernels finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

RUN_START = "start"
HOST_TO_DEVICE = "host_to_device"
COMPUTE = "compute"
DEVICE_TO_HOST = "device_to_host"


@dataclass(frozen=True)
class Span:
    label: str
    seconds: float  # on the device's clock
    host_seconds: float


class Timeline:
    def __init__(self, device: torch.device | str, layers: bool = False) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.layers = layers
        self._marks: list[tuple[str, float, torch.cuda.Event | None]] = []

    def mark(self, label: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((label, time.perf_counter(), event))

    def runs(self) -> list[list[Span]]:
        """The spans of each run so far, in order; each run begins at a :data:`RUN_START` mark."""
        if self.cuda and self._marks:
            # the last mark's event, not the device: other threads' streams may be capturing
            self._marks[-1][2].synchronize()
        runs: list[list[Span]] = []
        previous = None
        for label, host, event in self._marks:
            if label == RUN_START:
                runs.append([])
            elif previous is not None and runs:
                _, previous_host, previous_event = previous
                seconds = (
                    previous_event.elapsed_time(event) / 1e3 if self.cuda else host - previous_host
                )
                runs[-1].append(Span(label, seconds, host - previous_host))
            previous = (label, host, event)
        return runs

    def clear(self) -> None:
        self._marks.clear()
