"""Summaries of timings, as trtexec reports them, and the numbers that compare two arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

UNSTABLE_CV = 0.025  # a coefficient of variation above this makes a timing untrustworthy


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99 and max in milliseconds, and ``cv``: stdev / mean."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    summary = {
        "min": float(ms.min()),
        "mean": mean,
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "cv": float(ms.std() / mean) if mean > 0 else 0.0,
    }
    return {key: round(value, 6) for key, value in summary.items()}


@dataclass(frozen=True)
class Agreement:
    """How far ``actual`` is from ``expected``, and whether it is within tolerance.

    Within tolerance means ``|actual - expected| <= atol + rtol * |expected|`` everywhere, with
    NaNs in the same places counting as equal. ``max_rel`` is over elements where expected is
    not 0; ``cosine`` is over elements finite on both sides, and 1 for two all-zero arrays.
    """

    passed: bool
    max_abs: float
    max_rel: float
    cosine: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value != ""}


def agreement(actual: Any, expected: Any, atol: float, rtol: float) -> Agreement:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        note = f"shape {list(actual.shape)} vs {list(expected.shape)}"
        return Agreement(False, float("inf"), float("inf"), 0.0, note)
    if actual.dtype.kind not in "biufc" or expected.dtype.kind not in "biufc":
        equal = bool(np.array_equal(actual, expected))
        return Agreement(equal, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                         1.0 if equal else 0.0, "compared for equality")
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    same = (a == e) | (np.isnan(a) & np.isnan(e))  # equal infinities too
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - e))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is maximally wrong
    passed = bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(e))))
    nonzero = e != 0
    max_rel = float((diff[nonzero] / np.abs(e[nonzero])).max()) if nonzero.any() else (
        0.0 if not diff.any() else float("inf")
    )
    return Agreement(passed, float(diff.max()) if diff.size else 0.0, max_rel, _cosine(a, e))


def _cosine(a: np.ndarray, e: np.ndarray) -> float:
    finite = np.isfinite(a) & np.isfinite(e)
    a, e = a[finite], e[finite]
    norms = float(np.linalg.norm(a) * np.linalg.norm(e))
    if norms == 0:
        return 1.0 if not a.any() and not e.any() else 0.0
    return float(np.dot(a, e) / norms)
