"""Calibration statistics, thresholds, scales and the calibration cache."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from kiln.errors import ConfigError
from kiln.passes.calibration import (
    AMAX_FLOOR,
    HISTOGRAM_BINS,
    METHODS,
    RangeCollector,
    load_cache,
    save_cache,
    scale_for,
)


def fake_quant_int8(x: np.ndarray, amax: float) -> np.ndarray:
    scale = scale_for(amax, "int8")
    return np.clip(np.round(x / scale), -127, 127) * scale


def fake_quant_fp8(x: np.ndarray, amax: float) -> np.ndarray:
    scale = scale_for(amax, "fp8")
    return np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def observe_all(batches: list[np.ndarray], name: str = "t") -> RangeCollector:
    collector = RangeCollector()
    for batch in batches:
        collector.observe(name, batch)
    return collector


# -- statistics ------------------------------------------------------------------------------------


def test_minmax_is_the_abs_max_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1 + i, size=(4, 1000)).astype(np.float32) for i in range(5)]
    batches[2][1, 7] = -37.5  # the extreme value is negative and not in the last batch
    collector = observe_all(batches)
    data = np.concatenate([b.ravel() for b in batches])
    assert collector.amax("t", "minmax") == pytest.approx(37.5, rel=0, abs=0)
    stats = collector.stats("t")
    assert stats.min == float(data.min()) and stats.max == float(data.max())
    assert stats.samples == data.size and stats.batches == 5
    assert int(stats.histogram.sum()) == data.size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_tensors_of_each_float_type(dtype):
    torch.manual_seed(0)
    tensors = [torch.randn(3, 500, dtype=dtype) * (i + 1) for i in range(3)]
    collector = observe_all(tensors)
    expected = max(float(t.float().abs().max()) for t in tensors)
    assert collector.amax("t", "minmax") == expected


def test_bfloat16_numpy_arrays_are_accepted():
    array = np.array([0.5, -3.0, 2.0], dtype=ml_dtypes.bfloat16)
    assert observe_all([array]).amax("t", "minmax") == 3.0


def test_observe_leaves_the_tensor_unchanged():
    tensor = torch.tensor([-2.0, 1.0, -0.5])
    RangeCollector().observe("t", tensor)
    assert tensor.tolist() == [-2.0, 1.0, -0.5]


def test_nan_and_inf_are_counted_not_used():
    collector = observe_all([
        np.array([1.0, np.nan, -2.0, np.inf], dtype=np.float32),
        np.array([-np.inf, 0.5], dtype=np.float32),
        np.array([np.nan], dtype=np.float32),
    ])
    stats = collector.stats("t")
    assert (stats.nonfinite, stats.samples, stats.batches) == (4, 3, 3)
    assert collector.amax("t", "minmax") == 2.0
    assert collector.nonfinite() == {"t": 4}
    assert math.isfinite(collector.amax("t", "entropy"))


def test_integer_tensors_are_refused():
    with pytest.raises(TypeError, match="'ids'"):
        RangeCollector().observe("ids", np.arange(4))


def test_histogram_range_grows_and_keeps_every_count():
    rng = np.random.default_rng(1)
    # heavy-tailed batches whose spread grows, so the range widens several times
    batches = [(rng.laplace(size=20000) * scale).astype(np.float32) for scale in (0.1, 0.3, 1, 1, 4, 9, 2)]
    batches[3] = rng.standard_t(2, size=20000).astype(np.float32)
    collector = observe_all(batches)
    stats = collector.stats("t")
    data = np.abs(np.concatenate(batches)).astype(np.float64)
    assert int(stats.histogram.sum()) == data.size == stats.samples
    assert data.max() <= stats.hist_range < 2 * data.max()
    # merged bins hold the values they cover: the histogram matches one computed in one go
    expected, _ = np.histogram(data, bins=HISTOGRAM_BINS, range=(0, stats.hist_range))
    assert np.abs(stats.histogram - expected).sum() <= 1e-4 * data.size  # float32 vs float64 edges
    for percentile in (50, 90, 99, 99.9, 99.99):
        found = collector.amax("t", "percentile", percentile)
        assert abs(found - np.percentile(data, percentile)) <= stats.bin_width, percentile


def test_percentile_100_is_the_abs_max():
    collector = observe_all([np.random.default_rng(2).standard_t(3, size=5000).astype(np.float32)])
    assert collector.amax("t", "percentile", 100) == collector.amax("t", "minmax")


def test_zero_tensor_gets_a_positive_floor():
    collector = observe_all([np.zeros(100, np.float32), np.zeros((2, 3), np.float32)])
    for method in METHODS:
        amax = collector.amax("t", method)
        assert amax == AMAX_FLOOR
        for fmt in ("int8", "fp8"):
            scale = scale_for(amax, fmt)
            assert scale > 0 and math.isfinite(1 / np.float32(scale))


def test_zeros_before_the_first_nonzero_batch_stay_in_bin_0():
    collector = observe_all([np.zeros(50, np.float32), np.full(10, 2.0, np.float32)])
    stats = collector.stats("t")
    assert stats.histogram[0] == 50 and stats.histogram[-1] == 10 and stats.hist_range == 2.0


# -- entropy ---------------------------------------------------------------------------------------


def gaussian_with_outliers(seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(100_000).astype(np.float32) for _ in range(8)]
    batches[1][10] = 45.0
    batches[4][99] = -38.0
    batches[6][5] = 52.0
    return batches


def test_entropy_clips_outliers_and_beats_minmax():
    batches = gaussian_with_outliers()
    collector = observe_all(batches)
    data = np.concatenate(batches).astype(np.float64)
    minmax = collector.amax("t", "minmax")
    entropy = collector.amax("t", "entropy")
    assert minmax == 52.0
    assert 3.0 < entropy < 0.25 * minmax
    assert mse(fake_quant_int8(data, entropy), data) < 0.5 * mse(fake_quant_int8(data, minmax), data)


def reference_entropy_bins(hist: np.ndarray) -> int:
    """TensorRT's pseudo-code, one candidate at a time (with the same smoothing as the module)."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    total = bins.sum()
    best, best_i = math.inf, None
    for i in range(128, len(bins) + 1):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        q = np.zeros(i)
        chunk = (128 * np.arange(i)) // i
        for level in range(128):
            members = chunk == level
            filled = members & (bins[:i] > 0)
            if filled.any():
                q[filled] = bins[:i][members].sum() / filled.sum()
        if q.sum() == 0:
            continue
        p, q = p / total, q / q.sum()
        empty = (p > 0) & (q == 0)
        q = (q + 1e-4 * empty) / (1 + 1e-4 * empty.sum())
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl <= best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_matches_the_one_candidate_at_a_time_algorithm(seed):
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.standard_t(4, size=30000), rng.laplace(size=30000) * 0.5])
    data = np.maximum(data, 0) if seed else data  # a ReLU-like output: many exact zeros
    collector = observe_all([data.astype(np.float32)])
    stats = collector.stats("t")
    expected = reference_entropy_bins(stats.histogram) * stats.bin_width
    assert collector.amax("t", "entropy") == pytest.approx(min(expected, stats.amax), rel=1e-12)


def test_fp8_entropy_uses_the_fp8_grid():
    batches = gaussian_with_outliers()
    collector = observe_all(batches)
    data = np.concatenate(batches).astype(np.float64)
    int8 = collector.amax("t", "entropy", fmt="int8")
    fp8 = collector.amax("t", "entropy", fmt="fp8")
    minmax = collector.amax("t", "minmax")
    # fp8's resolution is relative: clipping at int8's threshold would cost far more than it gains
    assert fp8 > int8
    assert mse(fake_quant_fp8(data, fp8), data) <= 1.01 * mse(fake_quant_fp8(data, minmax), data)
    assert mse(fake_quant_fp8(data, fp8), data) < mse(fake_quant_fp8(data, int8), data)


# -- scales and validation -------------------------------------------------------------------------


def test_scales():
    assert scale_for(127.0, "int8") == 1.0
    assert scale_for(448.0, "fp8") == 1.0
    assert scale_for(2.0, "fp8") == pytest.approx(2.0 / 448)
    assert scale_for(0.0, "int8") == AMAX_FLOOR / 127
    # the threshold maps to the format's largest value, nothing clips below it
    x = np.array([-3.5, 3.5, 1.0])
    assert fake_quant_fp8(x, 3.5)[:2].tolist() == [-3.5, 3.5]
    with pytest.raises(ConfigError, match="int4"):
        scale_for(1.0, "int4")
    with pytest.raises(ValueError):
        scale_for(float("nan"), "int8")


@pytest.mark.parametrize("method, percentile, needle", [
    ("max", 99.99, "'max'"),
    ("percentile", 0, "0"),
    ("percentile", -1, "-1"),
    ("percentile", 100.5, "100.5"),
    ("percentile", float("nan"), "nan"),
    ("entropy", True, "True"),
])
def test_bad_method_or_percentile(method, percentile, needle):
    collector = observe_all([np.ones(4, np.float32)])
    with pytest.raises(ConfigError, match=needle):
        collector.amax("t", method, percentile)


def test_bad_format():
    collector = observe_all([np.ones(4, np.float32)])
    with pytest.raises(ConfigError, match="fp4"):
        collector.amax("t", "entropy", fmt="fp4")


def test_unknown_tensor():
    with pytest.raises(KeyError, match="'nope'"):
        RangeCollector().amax("nope", "minmax")


def test_amaxes_of_every_tensor():
    collector = RangeCollector()
    collector.observe("a", np.array([1.0, -4.0], np.float32))
    collector.observe("b", np.array([0.25], np.float32))
    assert collector.amaxes("minmax") == {"a": 4.0, "b": 0.25}


@pytest.mark.gpu
def test_cuda_statistics_match_cpu():
    torch.manual_seed(0)
    batches = [torch.randn(64, 1024) * (i + 1) for i in range(4)]
    batches[2][0, 0] = float("nan")
    cpu, gpu = RangeCollector(), RangeCollector()
    for batch in batches:
        cpu.observe("t", batch)
        gpu.observe("t", batch.cuda().half())
        cpu.observe("h", batch.half())
    for method in METHODS:
        assert gpu.amax("t", method) == pytest.approx(cpu.amax("h", method), rel=1e-6)
    assert np.array_equal(gpu.stats("t").histogram, cpu.stats("h").histogram)
    assert gpu.stats("t").nonfinite == 1


# -- cache -----------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "calib.json"
    amaxes = {"conv1": 2.5, "relu/out": 0.125, "zero": AMAX_FLOOR}
    save_cache(path, "abc123", "percentile", 99.9, amaxes)
    assert load_cache(path, "abc123", "percentile", 99.9) == amaxes
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["fingerprint"] == "abc123" and data["amax"] == amaxes
    assert [p.name for p in path.parent.iterdir()] == ["calib.json"]  # no temporary left behind


def test_cache_for_other_settings_is_not_used(tmp_path):
    path = tmp_path / "calib.json"
    assert load_cache(path, "abc", "minmax", 99.99) is None  # no file yet
    save_cache(path, "abc", "percentile", 99.9, {"x": 1.0})
    assert load_cache(path, "other", "percentile", 99.9) is None
    assert load_cache(path, "abc", "percentile", 99.99) is None
    assert load_cache(path, "abc", "entropy", 99.9) is None
    save_cache(path, "abc", "minmax", 99.9, {"x": 1.0})
    assert load_cache(path, "abc", "minmax", 50) == {"x": 1.0}  # minmax does not use the percentile
    save_cache(path, "abc", "entropy", 99.99, {"x": 1.0}, fmt="fp8")
    assert load_cache(path, "abc", "entropy", 99.99, fmt="int8") is None
    assert load_cache(path, "abc", "entropy", 99.99, fmt="fp8") == {"x": 1.0}


@pytest.mark.parametrize("text", [
    "{not json",
    "[1, 2]",
    '{"format": 7, "fingerprint": "abc", "method": "minmax", "percentile": 99.99, "amax": {}}',
    '{"format": 1, "fingerprint": "abc", "method": "minmax", "percentile": 99.99}',
    '{"format": 1, "fingerprint": "abc", "method": "minmax", "percentile": 99.99, "amax": {"x": "big"}}',
    '{"format": 1, "fingerprint": "abc", "method": "minmax", "percentile": 99.99, "amax": {"x": NaN}}',
])
def test_corrupt_cache_names_the_file(tmp_path, text):
    path = tmp_path / "calib.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="calib.json"):
        load_cache(path, "abc", "minmax", 99.99)


def test_unreadable_cache(tmp_path):
    path = tmp_path / "calib.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="calib.json"):
        load_cache(path, "abc", "minmax", 99.99)


def test_cache_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError):
        save_cache(tmp_path / "c.json", "abc", "mse", 99.99, {})
    with pytest.raises(ValueError, match="'x'"):
        save_cache(tmp_path / "c.json", "abc", "minmax", 99.99, {"x": float("inf")})
