"""Optimization profiles: their validation, the build's checks, and the runtime's range check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln import Profile
from kiln.config import BuildConfig
from kiln.engine.profiles import profile_symbols
from kiln.errors import ConfigError, EngineFormatError, InputError
from kiln.lowering import lower
from kiln.frontend.onnx import load_onnx
from kiln.runtime import from_bytes
from tests.graphs import mlp, mlp_reference

IDS = ((1, 16), (8, 128), (64, 512))


def masked(second: list | None = None) -> onnx.ModelProto:
    """out = ids * mask, both [batch, seq] (or ``second`` for mask's dims)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["ids", "mask"], ["out"])],
        "masked",
        [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, second or ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ones(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


# -- Profile itself -----------------------------------------------------------------------------

def test_profile_takes_ranges_or_one_shape():
    profile = Profile({"ids": IDS, "mask": [8, 128]})
    assert profile.shapes["ids"] == IDS
    assert profile.shapes["mask"] == ((8, 128),) * 3
    assert profile.describe() == "ids 1x16..64x512, mask 8x128"
    assert Profile.from_json(profile.to_json()) == profile
    assert hash(profile) == hash(Profile({"ids": IDS, "mask": (8, 128)}))
    assert profile.to_json()["ids"] == {"min": [1, 16], "opt": [8, 128], "max": [64, 512]}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({}, "maps input names"),
        ({"ids": ((1, 16), (8, 128))}, "three of them"),
        ({"ids": ((1, 16), (8, 128, 1), (64, 512))}, "same rank"),
        ({"ids": ((1, 16), (8, 8), (64, 512))}, "1 <= min <= opt <= max"),
        ({"ids": ((0, 16), (8, 128), (64, 512))}, "1 <= min <= opt <= max"),
        ({"ids": ((1, 16), (8.0, 128), (64, 512))}, "positive ints"),
        ({"ids": ((True, 16), (8, 128), (64, 512))}, "positive ints"),
        ({"ids": "1x16"}, "positive ints"),
        ({"": (1, 16)}, "non-empty strings"),
    ],
)
def test_profile_validation(shapes, message):
    with pytest.raises(ConfigError, match=message):
        Profile(shapes)


def test_dims_resolve_symbols_at_each_point():
    profile = Profile({"ids": IDS, "mask": IDS})
    signature = {"ids": ("batch", "seq"), "mask": ("batch", None), "other": (3,)}
    assert profile.dims(signature, "min") == {"batch": 1, "seq": 16}
    assert profile.dims(signature, "opt") == {"batch": 8, "seq": 128}
    assert profile.dims(signature, "max") == {"batch": 64, "seq": 512}
    assert Profile({"x": (2, 3)}).dims({"x": None}) == {}  # rank unknown: the profile says


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ({"mask": ("batch", "seq")}, "unknown input 'ids'; the model's inputs are: mask"),
        ({"ids": ("batch",)}, "rank 2 .* declares rank 1"),
        ({"ids": (1, "seq")}, "sizes 1..64 \\(opt 8\\) in dimension 0, which the model fixes at 1"),
        ({"ids": ("n", "n")}, "dimension 'n' sizes 1..64 .* but 16..512"),
    ],
)
def test_dims_errors(signature, message):
    with pytest.raises(ConfigError, match=message):
        Profile({"ids": IDS}).dims(signature)


def test_dims_rejects_one_symbol_with_two_ranges_across_inputs():
    profile = Profile({"ids": IDS, "mask": ((2, 16), (8, 128), (64, 512))})
    with pytest.raises(ConfigError, match="'batch' sizes 1..64 \\(opt 8\\) in input 'ids' but 2..64"):
        profile.dims({"ids": ("batch", "seq"), "mask": ("batch", "seq")})


def test_build_config_normalises_profiles():
    one = Profile({"ids": IDS})
    assert BuildConfig().profiles == ()
    assert BuildConfig(profiles=one).profiles == (one,)
    assert BuildConfig(profiles=[one, {"ids": (4, 4)}]).profiles == (one, Profile({"ids": (4, 4)}))
    assert BuildConfig(profiles={"ids": IDS}).profiles == (one,)
    assert BuildConfig().replace(profiles=[one]).profiles == (one,)
    with pytest.raises(ConfigError, match="Profile or a list"):
        BuildConfig(profiles=3)


def test_timing_cache_is_a_path():
    assert BuildConfig().timing_cache is None
    assert BuildConfig(timing_cache="cache.json").timing_cache == "cache.json"
    with pytest.raises(ConfigError, match="timing_cache"):
        BuildConfig(timing_cache=3)


# -- build --------------------------------------------------------------------------------------

def test_engine_without_profiles_takes_any_shape():
    engine = kiln.build(mlp(), device="cpu")
    assert engine.profiles == () and engine.manifest["profiles"] == []
    engine.run({"x": ones(1000, 4)})


def test_engine_runs_inside_its_profile_and_names_the_ranges_outside():
    engine = kiln.build(mlp(), device="cpu", profiles=Profile({"x": ((1, 4), (8, 4), (16, 4))}))
    assert engine.manifest["profiles"] == [{"x": {"min": [1, 4], "opt": [8, 4], "max": [16, 4]}}]
    for batch in (1, 7, 16):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["y"], mlp_reference(x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError) as error:
        engine.run({"x": ones(17, 4)})
    assert str(error.value) == (
        "input shapes x[17x4] fit no optimization profile of this engine: profile 0: x 1x4..16x4"
    )


def test_shapes_must_fit_one_profile_entirely():
    profiles = [Profile({"ids": IDS, "mask": IDS}), Profile({"ids": (128, 600), "mask": (128, 600)})]
    engine = from_bytes(kiln.build(masked(), device="cpu", profiles=profiles).to_bytes())
    assert engine.profiles == tuple(profiles)
    assert engine.run({"ids": ones(2, 20), "mask": ones(2, 20)})["out"].shape == (2, 20)
    assert engine.run({"ids": ones(128, 600), "mask": ones(128, 600)})["out"].shape == (128, 600)
    with pytest.raises(InputError) as error:
        engine.run({"ids": ones(100, 600), "mask": ones(100, 600)})
    assert str(error.value) == (
        "input shapes ids[100x600], mask[100x600] fit no optimization profile of this engine: "
        "profile 0: ids 1x16..64x512, mask 1x16..64x512; profile 1: ids 128x600, mask 128x600"
    )


def test_profile_naming_an_unknown_input_fails_the_build():
    with pytest.raises(ConfigError, match="names unknown input 'y'; the model's inputs are: x"):
        kiln.build(mlp(), device="cpu", profiles=[{"y": (1, 4)}])


def test_profile_contradicting_a_static_dimension_fails_the_build():
    with pytest.raises(ConfigError, match="input 'x' sizes 3 in dimension 1, which the model fixes at 4"):
        kiln.build(mlp(), device="cpu", profiles=[{"x": ((1, 3), (2, 3), (4, 3))}])


def test_every_open_input_must_be_in_every_profile():
    both = {"ids": IDS, "mask": IDS}
    with pytest.raises(ConfigError, match="optimization profile 1 does not cover input 'mask'.*--shapes"):
        kiln.build(masked(), device="cpu", profiles=[both, {"ids": IDS}])
    unknown_dim = masked(second=[None, "seq"])  # a dimension without a name is open too
    with pytest.raises(ConfigError, match="does not cover input 'mask'"):
        kiln.build(unknown_dim, device="cpu", profiles=[{"ids": IDS}])


def test_stored_profiles_are_checked_on_load():
    data = kiln.build(mlp(), device="cpu", profiles={"x": (2, 4)})
    data.manifest["profiles"] = [{"x": {"min": [4, 4], "opt": [2, 4], "max": [4, 4]}}]
    with pytest.raises(EngineFormatError, match="stored optimization profile"):
        from_bytes(data.to_bytes())


def test_profile_symbols_for_tuning_and_planning():
    graph = lower(load_onnx(masked())).graph
    config = BuildConfig(profiles=[{"ids": IDS, "mask": IDS}, {"ids": (2, 2), "mask": (2, 2)}])
    assert profile_symbols(config, graph) == {"batch": 8, "seq": 128}
    assert profile_symbols(config, graph, "max") == {"batch": 64, "seq": 512}
    assert profile_symbols(BuildConfig(), graph) == {}
