"""Summaries of timings, as trtexec reports them."""

from __future__ import annotations

from collections.abc import Sequence

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
