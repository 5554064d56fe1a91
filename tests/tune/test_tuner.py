"""Choice selection without a GPU: preferences, the timing cache file, untimed defaults."""

from __future__ import annotations

import json

import pytest
import torch

import kiln
from kiln.errors import ConfigError, EngineFormatError
from kiln.kernels.catalog import FALLBACK, choices_for
from kiln.kernels.launch import launcher
from kiln.lowering.spec import KernelSpec, ValueType
from kiln.tune import TimingCache, Tuner
from kiln.tune.select import _agrees


def _attention_spec(shape=(2, 128, 768)) -> KernelSpec:
    tensor = ValueType("tensor", 10, shape)
    return KernelSpec.create("Attention", "kiln", 1, {"num_heads": {"int": 12}}, (tensor,) * 3, (tensor,))


def test_the_cpu_runs_the_ops_fallback_only():
    assert choices_for(_attention_spec(), "cpu") == [FALLBACK]


def test_back_ends_that_suit_some_shapes_are_never_the_untimed_default():
    spec = _attention_spec(("batch", "seq", 768))
    candidates = choices_for(spec, "cuda")
    assert candidates[0].timed_only and candidates[-1] is FALLBACK
    selection = Tuner("cuda", 3, TimingCache(), symbols={}, target={}).select(spec)
    assert selection.choice is FALLBACK and selection.timings == {}  # 'seq' unknown: not timed


def test_level_0_takes_the_first_default_choice_without_timing():
    spec = KernelSpec.create(
        "FusedConv", "kiln", 1, {}, (ValueType("tensor", 10, (1, 3, 8, 8)), ValueType("tensor", 10, (4, 3, 3, 3))),
        (ValueType("tensor", 10, (1, 4, 6, 6)),),
    )
    selection = Tuner("cuda", 0, TimingCache(), symbols={}, target={}).select(spec)
    assert selection.choice.id == "cudnn-conv-nhwc" and selection.ms is None


def test_timing_cache_round_trip(tmp_path):
    path = tmp_path / "cache" / "timings.json"
    cache = TimingCache(path)
    key = TimingCache.key({"spec": 1})
    cache.put(key, {"ops": 0.5, "sdpa-flash": float("inf")})
    cache.save()
    again = TimingCache(path)
    assert again.get(key) == {"ops": 0.5, "sdpa-flash": float("inf")} and again.hits == 1
    assert TimingCache.key({"spec": 1}) != TimingCache.key({"spec": 2})


def test_a_timing_cache_of_another_format_starts_afresh(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"format": 0, "entries": {"k": {"ops": 1}}}))
    assert TimingCache(path).entries == {}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="timing cache"):
        TimingCache(path)


def test_cpu_builds_write_the_timing_cache_and_record_tuning(tmp_path):
    from tests.graphs import mlp

    cache = tmp_path / "timings.json"
    engine = kiln.build(mlp(), device="cpu", timing_cache=str(cache))
    assert cache.exists()
    tuning = engine.manifest["build"]["tuning"]
    assert tuning["specs"] >= 1 and tuning["timed"] == 0
    assert all(layer["choice"] == "ops" and layer["timed_ms"] is None for layer in engine.layers)


def test_an_unknown_or_misplaced_choice_is_a_format_error():
    with pytest.raises(EngineFormatError, match="rebuild"):
        launcher({"choice": "warp-drive"}, "Relu", "", 14, "relu")
    with pytest.raises(EngineFormatError, match="rebuild"):
        launcher({"choice": "cudnn-conv-nhwc"}, "Relu", "", 14, "relu")


@pytest.mark.parametrize("dtype, step, beyond", [
    (torch.int8, 1.0, 2.0), (torch.float8_e4m3fn, 0.5, 1.0),  # 4.0 and 4.5 are adjacent in e4m3
])
def test_quantized_outputs_agree_one_step_apart(dtype, step, beyond):
    """A choice quantizing float values it rounded its own way may land a step from the reference;
    further is a wrong result."""
    reference = torch.tensor([4.0, -3.0, 0.0, 100.0]).to(dtype)
    one_step = torch.tensor([4.0 + step, -3.0, 0.0, 100.0]).to(dtype)
    further = torch.tensor([4.0 + beyond + step, -3.0, 0.0, 100.0]).to(dtype)
    scales = torch.tensor([0.5, 0.25])
    assert _agrees((one_step, scales), (reference, scales))
    assert not _agrees((further, scales), (reference, scales))
    assert not _agrees((one_step, scales * 1.01), (reference, scales))
