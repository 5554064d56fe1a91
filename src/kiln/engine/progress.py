"""Build progress: the events a build reports, for its caller to render.

The library never prints; ``kiln build`` draws these events as a progress display, or writes them
as JSON lines. A phase reports ``start``, optionally ``advance`` once per unit of work when its
size is known in advance (``completed`` of ``total``), then ``end`` with its time, or ``failed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

# The phases of kiln.build, in order; int8/fp8 builds also report "calibration", within "passes";
# fp16 builds given calibration data report "fp16 range" after "import"; builds under an accuracy
# budget (or precision "best") report their candidate engines in one "budget" phase around them;
# int8/fp8 builds on a GPU compare their layers with fp16 in an "fp16 fallback" phase after "plan".
# Callers that do more (writing the file) add their own.
BUILD_PHASES = ("import", "passes", "lowering", "tuning", "plan")


@dataclass(frozen=True)
class ProgressEvent:
    phase: str
    state: str  # "start", "advance", "end" or "failed"
    completed: int | None = None
    total: int | None = None
    detail: str = ""  # on advance: the unit just done; on end: a summary of the phase
    seconds: float | None = None  # on end and failed: time since the phase started

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, "")}


ProgressCallback = Callable[[ProgressEvent], None]


class Phase:
    """A running phase: count units with :meth:`advance`, leave a summary in ``detail``."""

    def __init__(self, report: ProgressCallback, name: str, total: int | None) -> None:
        self._report = report
        self.name = name
        self.total = total
        self.completed = 0
        self.detail = ""

    def advance(self, detail: str = "") -> None:
        self.completed += 1
        self._report(ProgressEvent(self.name, "advance", self.completed, self.total, detail))


def _ignore(event: ProgressEvent) -> None:
    pass


@contextmanager
def phase(callback: ProgressCallback | None, name: str, total: int | None = None) -> Iterator[Phase]:
    """Report ``name`` as started, then ended (with its time) or failed."""
    report = callback or _ignore
    start = time.perf_counter()
    current = Phase(report, name, total)
    report(ProgressEvent(name, "start", 0 if total is not None else None, total))
    try:
        yield current
    except BaseException:
        report(ProgressEvent(name, "failed", seconds=round(time.perf_counter() - start, 4)))
        raise
    completed = current.completed if total is not None else None
    report(
        ProgressEvent(
            name, "end", completed, total, current.detail, round(time.perf_counter() - start, 4)
        )
    )
