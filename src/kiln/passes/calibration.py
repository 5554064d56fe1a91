"""Post-training quantization calibration: activation statistics -> clipping thresholds -> scales.

A :class:`RangeCollector` watches the values a tensor takes over many calibration batches and keeps,
per tensor, the running abs-max, min and max and a histogram of ``|x|``. From these
:meth:`RangeCollector.amax` derives a clipping threshold ("amax") by one of :data:`METHODS`:

``minmax``
    the running abs-max: nothing is clipped, outliers cost resolution.
``percentile``
    the ``|x|`` value below which ``percentile`` percent of the observed values lie (read off the
    histogram, interpolated within a bin): clips the rarest outliers.
``entropy``
    TensorRT's KL-divergence calibration: the threshold whose quantized distribution loses the
    least information against the observed one (see :func:`_entropy_amax`).

:func:`scale_for` turns a threshold into a symmetric scale (``amax / 127`` for int8, ``amax / 448``
for fp8 E4M3), and :func:`save_cache` / :func:`load_cache` keep thresholds in a JSON file so a
rebuild with the same model and calibration data skips calibration.

Reductions run on the tensor's own device (CPU or CUDA); only a few scalars and the 2048 histogram
counts travel to the host per batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from kiln.config import CALIBRATION_METHODS, QUANTIZED_PRECISIONS
from kiln.errors import ConfigError
from kiln.ops.dtypes import to_torch

log = logging.getLogger("kiln.calibration")

METHODS = CALIBRATION_METHODS
FORMATS = QUANTIZED_PRECISIONS
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
FORMAT_MAX = {"int8": INT8_MAX, "fp8": FP8_E4M3_MAX}
# The smallest threshold handed out: a tensor that was zero throughout (or never finite) has amax 0,
# and a zero scale would divide by zero downstream. Any positive scale represents zero exactly, and
# 1e-12 keeps both the scale and its reciprocal normal float32 numbers for int8 and fp8.
AMAX_FLOOR = 1e-12
HISTOGRAM_BINS = 2048
ENTROPY_START_BIN = 128  # the smallest candidate threshold, in bins (TensorRT's choice)
INT8_LEVELS = 128  # non-negative int8 levels TensorRT's entropy calibration quantizes |x| to
_KL_SMOOTHING = 1e-4  # probability given to a bin the quantized distribution left empty
CACHE_FORMAT = 1


@dataclass
class TensorStats:
    """What a :class:`RangeCollector` knows about one tensor.

    ``samples`` counts the finite values observed, ``nonfinite`` the NaN and inf values skipped,
    ``batches`` the calls to ``observe``. ``amax``, ``min`` and ``max`` are over finite values (0
    before any). ``histogram`` holds the counts of ``|x|`` in :data:`HISTOGRAM_BINS` equal bins
    over ``[0, hist_range]`` (the last bin closed); ``hist_range`` is 0 until a non-zero value is
    seen, all counts then sitting in bin 0.
    """

    batches: int = 0
    samples: int = 0
    nonfinite: int = 0
    amax: float = 0.0
    min: float = 0.0
    max: float = 0.0
    hist_range: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))

    @property
    def bin_width(self) -> float:
        return self.hist_range / HISTOGRAM_BINS


class RangeCollector:
    """Per-tensor statistics over calibration batches, and the clipping thresholds they imply.

    The histogram's range starts at the first non-zero batch's abs-max. When a later batch exceeds
    it, the range grows by the smallest whole factor ``k`` that covers the batch and every ``k``
    adjacent old bins merge into one new bin. Merging whole bins keeps every count in a bin that
    contains its value (nothing is smeared across bin edges, however often the range grows); the
    price is a range up to twice the abs-max, so at worst half the 2048 bins cover the data.
    """

    def __init__(self) -> None:
        self._stats: dict[str, TensorStats] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    @property
    def names(self) -> list[str]:
        """The tensors observed, in the order first seen."""
        return list(self._stats)

    def stats(self, name: str) -> TensorStats:
        try:
            return self._stats[name]
        except KeyError:
            raise KeyError(f"no calibration statistics for tensor {name!r}; observe() it first") from None

    def nonfinite(self) -> dict[str, int]:
        """Tensor name -> NaN/inf values skipped, for the tensors that had any."""
        return {name: s.nonfinite for name, s in self._stats.items() if s.nonfinite}

    def observe(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """Add one batch of ``tensor``'s values (any floating type; NaN and inf are counted, not used)."""
        values = _as_tensor(name, tensor).detach().reshape(-1)
        stats = self._stats.setdefault(name, TensorStats())
        stats.batches += 1
        if values.numel() == 0:
            return
        finite = torch.isfinite(values)
        bad = values.numel() - int(finite.sum())
        if bad:
            if not stats.nonfinite:
                log.warning("tensor %r holds NaN or inf values; calibration ignores them", name)
            stats.nonfinite += bad
            values = values[finite]
            if values.numel() == 0:
                return
        values = values.float()  # fp16/bf16 reduce and bin in fp32, on the tensor's device
        low, high = torch.aminmax(values)
        low, high = torch.stack([low, high]).tolist()
        amax = max(-low, high)
        if stats.samples == 0:
            stats.min, stats.max = low, high
        else:
            stats.min, stats.max = min(stats.min, low), max(stats.max, high)
        stats.amax = max(stats.amax, amax)
        stats.samples += values.numel()
        if amax > stats.hist_range:
            _widen(stats, amax)
        if stats.hist_range == 0.0:  # only zeros so far
            stats.histogram[0] += values.numel()
            return
        index = (values.abs() / stats.hist_range * HISTOGRAM_BINS).long().clamp_(max=HISTOGRAM_BINS - 1)
        stats.histogram += torch.bincount(index, minlength=HISTOGRAM_BINS).cpu().numpy()

    def amax(self, name: str, method: str, percentile: float = 99.99, fmt: str = "int8") -> float:
        """The clipping threshold of tensor ``name`` by ``method`` (one of :data:`METHODS`).

        ``percentile`` (in (0, 100]) is used by the ``percentile`` method; ``fmt`` (``"int8"`` or
        ``"fp8"``) by ``entropy``, which quantizes to the format's own grid (see
        :func:`_entropy_amax`). The result is never below :data:`AMAX_FLOOR`: a tensor that was
        zero throughout (or held no finite value) gets that tiny positive threshold, so callers
        always have a positive scale. Raises :class:`ConfigError` for an unknown method or format
        or a percentile out of range.
        """
        check_method(method, percentile)
        check_format(fmt)
        stats = self.stats(name)
        if stats.amax <= 0.0:
            return AMAX_FLOOR
        if method == "minmax" or (method == "percentile" and percentile == 100):
            found = stats.amax
        elif method == "percentile":
            found = _percentile_amax(stats, percentile)
        else:
            found = _entropy_amax(stats, fmt)
        return max(min(found, stats.amax), AMAX_FLOOR)

    def amaxes(self, method: str, percentile: float = 99.99, fmt: str = "int8") -> dict[str, float]:
        """:meth:`amax` of every observed tensor."""
        return {name: self.amax(name, method, percentile, fmt) for name in self._stats}


def check_method(method: str, percentile: float = 99.99) -> None:
    """Raise :class:`ConfigError` unless ``method`` is one of :data:`METHODS` and 0 < percentile <= 100."""
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(METHODS)}, not {method!r}")
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not 0 < percentile <= 100
    ):
        raise ConfigError(
            f"calibration percentile must be a number in (0, 100], such as 99.99, not {percentile!r}"
        )


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"quantized format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def scale_for(amax: float, fmt: str) -> float:
    """The symmetric quantization scale for threshold ``amax``: ``amax / 127`` (int8) or
    ``amax / 448`` (fp8 E4M3). ``amax`` below :data:`AMAX_FLOOR` (zero) is raised to it."""
    check_format(fmt)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"a clipping threshold is a finite non-negative number, not {amax!r}")
    return max(float(amax), AMAX_FLOOR) / FORMAT_MAX[fmt]


def _as_tensor(name: str, tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = to_torch(np.asarray(tensor))
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} holds strings; calibration needs floating values")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}; calibration needs floating values")
    return tensor


def _widen(stats: TensorStats, amax: float) -> None:
    """Grow the histogram's range to cover ``amax``, merging whole bins (see RangeCollector)."""
    if stats.hist_range == 0.0:  # the zeros seen so far stay in bin 0
        stats.hist_range = amax
        return
    factor = math.ceil(amax / stats.hist_range)
    while factor * stats.hist_range < amax:  # float rounding in the division
        factor += 1
    merged = -(-HISTOGRAM_BINS // factor)
    old = np.zeros(merged * factor, dtype=np.int64)
    old[:HISTOGRAM_BINS] = stats.histogram
    stats.histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    stats.histogram[:merged] = old.reshape(merged, factor).sum(axis=1)
    stats.hist_range *= factor


def _percentile_amax(stats: TensorStats, percentile: float) -> float:
    """The |x| below which ``percentile`` percent of the values lie, interpolated within its bin."""
    counts = stats.histogram
    cumulative = np.cumsum(counts)
    target = cumulative[-1] * percentile / 100.0
    index = int(np.searchsorted(cumulative, target))
    index = min(index, HISTOGRAM_BINS - 1)
    before = cumulative[index - 1] if index else 0
    inside = (target - before) / counts[index] if counts[index] else 1.0
    return (index + inside) * stats.bin_width


def _entropy_amax(stats: TensorStats, fmt: str) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q).

    For each candidate threshold of ``i`` bins (``i`` from 128 to 2048): the reference P is
    ``hist[:i]`` with the counts beyond (the values the threshold clips) added to its last bin;
    Q quantizes ``hist[:i]`` to the format's levels, spreads each level's count evenly over its
    non-empty bins and is normalized. Bins Q leaves empty where P is not get a small probability
    (1e-4, then renormalized) so that the divergence stays finite. The largest threshold of least
    divergence wins. As pytorch-quantization does, bin 0 (|x| near 0) counts as bin 1 does, so the
    exact zeros of ReLU outputs do not dominate.

    int8: TensorRT's 128 equal levels over [0, threshold]. fp8: the non-negative E4M3 values,
    each bin going to the level nearest its centre after scaling the threshold to 448. The uniform
    128-level grid would model a format with 3 mantissa bits as if it had 7, pushing fp8 to clip
    as hard as int8 although its relative resolution barely depends on the scale; on fp8's own
    grid the divergence weighs exactly the rounding fp8 does, so this is the same algorithm,
    measured against the format in use.
    """
    hist = stats.histogram.astype(np.float64)
    hist[0] = hist[1]
    total = hist.sum()
    if total == 0:
        return stats.amax
    bins = np.arange(HISTOGRAM_BINS)
    beyond = total - np.cumsum(hist)  # beyond[i - 1]: counts at bins >= i
    nonzero = hist > 0
    best_divergence, best_bins = math.inf, HISTOGRAM_BINS
    block = 128
    for start in range(ENTROPY_START_BIN, HISTOGRAM_BINS + 1, block):
        candidates = np.arange(start, min(start + block, HISTOGRAM_BINS + 1))
        rows = len(candidates)
        inside = bins[None, :] < candidates[:, None]  # (rows, bins)
        levels = np.where(inside, _levels(candidates, fmt), 0)
        width = levels.max() + 1
        key = (np.arange(rows)[:, None] * width + levels)[inside]
        sums = np.bincount(key, weights=np.broadcast_to(hist, inside.shape)[inside], minlength=rows * width)
        filled = np.bincount(key, weights=np.broadcast_to(nonzero, inside.shape)[inside].astype(np.float64),
                             minlength=rows * width)
        flat = np.arange(rows)[:, None] * width + levels
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(inside & nonzero, sums[flat] / filled[flat], 0.0)
        p = np.where(inside, hist, 0.0)
        p[np.arange(rows), candidates - 1] += beyond[candidates - 1]
        p /= total
        q_total = q.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = q / q_total
            empty = (p > 0) & (q == 0)
            q = (q + _KL_SMOOTHING * empty) / (1.0 + _KL_SMOOTHING * empty.sum(axis=1, keepdims=True))
            terms = np.where(p > 0, p * np.log(p / q), 0.0)
        divergence = terms.sum(axis=1)
        divergence[q_total[:, 0] == 0] = math.inf  # everything clipped: no distribution to compare
        for candidate, value in zip(candidates, divergence):
            if value <= best_divergence:  # ties go to the larger threshold
                best_divergence, best_bins = value, int(candidate)
    return best_bins * stats.bin_width


def _levels(candidates: np.ndarray, fmt: str) -> np.ndarray:
    """(candidates, bins): the quantization level each bin falls in, per candidate threshold."""
    bins = np.arange(HISTOGRAM_BINS)
    if fmt == "int8":
        # TensorRT splits [0, i) into 128 equal chunks: bin j goes to chunk floor(128 j / i).
        return (INT8_LEVELS * bins[None, :]) // candidates[:, None]
    centres = (bins[None, :] + 0.5) / candidates[:, None] * FP8_E4M3_MAX
    centres = np.minimum(centres, FP8_E4M3_MAX).astype(np.float32)
    # non-negative E4M3 codes are ordered like their values; 126 (0x7E) is 448
    return centres.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int64)


# -- calibration cache -----------------------------------------------------------------------------


def save_cache(
    path: str | os.PathLike,
    fingerprint: str,
    method: str,
    percentile: float,
    amaxes: dict[str, float],
    *,
    fmt: str = "int8",
    channels: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write calibration thresholds to ``path`` as JSON, atomically.

    ``fingerprint`` names what the thresholds depend on besides the method (the model and the
    calibration data, typically a digest of both); :func:`load_cache` hands them back only for the
    same fingerprint, method and method parameters. The file::

        {"format": 1, "fingerprint": ..., "method": ..., "percentile": ..., "fmt": ...,
         "amax": {tensor name: threshold}, "channel_amax": {tensor name: [abs-max per channel]}}

    ``channels``: per-channel abs-maxima (over the last axis), which no method changes.
    """
    check_method(method, percentile)
    check_format(fmt)
    amax = {}
    for name, value in amaxes.items():
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"threshold of tensor {name!r} must be finite and non-negative, not {value!r}")
        amax[str(name)] = value
    data = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "method": method,
        "percentile": float(percentile),
        "fmt": fmt,
        "amax": amax,
        "channel_amax": {str(name): np.asarray(values, np.float64).tolist()
                         for name, values in (channels or {}).items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".calibration-cache-")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(data, file, sort_keys=True, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_cache(
    path: str | os.PathLike,
    fingerprint: str,
    method: str,
    percentile: float,
    *,
    fmt: str = "int8",
) -> dict[str, float] | None:
    """The thresholds :func:`save_cache` stored at ``path``, or None when there is no file or it
    was made for another fingerprint, method or method parameter (the caller then recalibrates).

    Parameters a method does not use do not matter: ``percentile`` is compared for the
    ``percentile`` method only, ``fmt`` for ``entropy`` only. A file that cannot be read or is
    not a calibration cache raises :class:`ConfigError` naming it.
    """
    check_method(method, percentile)
    check_format(fmt)
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"calibration cache {path} cannot be read ({error}); delete it or give another path"
        ) from None
    data = _parse_cache(path, text)
    if data["fingerprint"] != fingerprint or data["method"] != method:
        return None
    if method == "percentile" and data["percentile"] != float(percentile):
        return None
    if method == "entropy" and data.get("fmt", "int8") != fmt:
        return None
    return data["amax"]


def load_channel_cache(path: str | os.PathLike, fingerprint: str) -> dict[str, np.ndarray]:
    """The per-channel abs-maxima :func:`save_cache` stored at ``path`` for ``fingerprint``
    (whatever the method), or nothing."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"calibration cache {path} cannot be read ({error}); delete it or give another path"
        ) from None
    data = _parse_cache(path, text)
    if data["fingerprint"] != fingerprint:
        return {}
    channels = data.get("channel_amax", {})
    if not isinstance(channels, dict) or not all(
        isinstance(v, list) and all(isinstance(x, (int, float)) and 0 <= x < math.inf for x in v)
        for v in channels.values()
    ):
        raise ConfigError(f"calibration cache {path} is not valid (bad 'channel_amax'); delete it")
    return {name: np.asarray(values, np.float64) for name, values in channels.items()}


def _parse_cache(path: Path, text: str) -> dict[str, Any]:
    def corrupt(why: str) -> ConfigError:
        return ConfigError(f"calibration cache {path} is not valid ({why}); delete it to recalibrate")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise corrupt(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise corrupt("not a JSON object")
    if data.get("format") != CACHE_FORMAT:
        raise corrupt(f"format {data.get('format')!r}, this kiln reads format {CACHE_FORMAT}")
    for key, kind in (("fingerprint", str), ("method", str), ("percentile", (int, float)), ("amax", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise corrupt(f"{key!r} missing or of the wrong type")
    amax = {}
    for name, value in data["amax"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise corrupt(f"threshold of tensor {name!r} is {value!r}")
        amax[name] = float(value)
    data["amax"] = amax
    data["percentile"] = float(data["percentile"])
    return data
