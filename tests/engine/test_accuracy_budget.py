"""Accuracy budgets: parsing, the search for the layers to keep in fp32, ``best``, and the fp16
range fallback, on CPU engines measured against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln.config import AccuracyBudget, BudgetTerm, BuildConfig
from kiln.errors import BuildError, ConfigError
from kiln.precision_search import MANIFEST_KEY, search_layer_precisions
from tests.graphs import mlp
from tests.precision_graphs import SENSITIVE, batches, conv_chain


def _precisions(engine: kiln.Engine) -> dict[str, str]:
    return {layer["name"]: layer["precision"] for layer in engine.layers if layer["op"] != "Cast"}


def _worst_sample_cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    a = ours.reshape(len(ours), -1).astype(np.float64)
    e = theirs.reshape(len(theirs), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1)
    return float(np.min(np.where(norms > 0, (a * e).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)))


def _onnxruntime(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


# --- budgets -------------------------------------------------------------------------------------

def test_budget_text_parses_into_terms():
    budget = AccuracyBudget.parse(" cosine >= 0.999 , top1>=0.99,max_abs<=1e-3, max_rel<=0.5")
    assert budget.terms == (
        BudgetTerm("cosine", 0.999), BudgetTerm("top1", 0.99), BudgetTerm("max_abs", 1e-3),
        BudgetTerm("max_rel", 0.5),
    )
    assert str(budget) == "cosine>=0.999,top1>=0.99,max_abs<=0.001,max_rel<=0.5"
    assert AccuracyBudget.parse(str(budget)) == budget
    values = {"cosine": 0.9995, "top1": 1.0, "max_abs": 1e-4, "max_rel": 0.1}
    assert budget.holds(values)
    assert not budget.holds({**values, "cosine": 0.998})
    assert not budget.holds({**values, "max_abs": 0.002})
    assert not budget.holds({**values, "cosine": float("nan")})
    config = BuildConfig(precision="int8", accuracy_budget="cosine>=0.999")
    assert config.accuracy_budget == AccuracyBudget((BudgetTerm("cosine", 0.999),))
    assert config.replace(opt_level=2).accuracy_budget == config.accuracy_budget


@pytest.mark.parametrize("text, message", [
    ("", "one or more of cosine>=X, top1>=X, max_abs<=X, max_rel<=X"),
    ("cosine>0.9", "'cosine>0.9' is not METRIC>=X or METRIC<=X"),
    ("cosine>=0.9,", "'' is not METRIC>=X"),
    ("cos>=0.9", "unknown metric 'cos'"),
    ("cosine<=0.9", "cosine takes a lower bound, cosine>=X"),
    ("max_abs>=1", "max_abs takes an upper bound, max_abs<=X"),
    ("cosine>=abc", "'abc' is not a number"),
    ("cosine>=1.5", "cosine takes from -1 to 1, not 1.5"),
    ("top1>=nan", "top1 takes from 0 to 1, not nan"),
    ("max_rel<=-1", "max_rel takes a finite number >= 0, not -1.0"),
    ("max_abs<=inf", "max_abs takes a finite number >= 0, not inf"),
    ("cosine>=0.9,cosine>=0.99", "bounds cosine more than once"),
])
def test_malformed_budget_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AccuracyBudget.parse(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        BuildConfig(precision="fp16", accuracy_budget=text)


def test_best_needs_a_budget():
    with pytest.raises(ConfigError, match="precision 'best' .* give one, e.g. accuracy_budget="):
        BuildConfig(precision="best")
    with pytest.raises(ConfigError, match="accuracy_budget must be an AccuracyBudget or its text"):
        BuildConfig(accuracy_budget=0.999)


# --- the search ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    return conv_chain(outlier_scale=1000.0)


def test_int8_search_keeps_the_planted_layer_in_fp32(planted):
    options = dict(device="cpu", precision="int8", calibration_method="minmax")
    plain = kiln.build(planted, calibration_data=batches(3), **options)
    feed = batches(1, seed=7, batch=16)[0]
    reference = _onnxruntime(planted, feed)
    assert _worst_sample_cosine(plain.run(feed)["y"], reference) < 0.9  # the planted loss is real

    engine = kiln.build(
        planted, calibration_data=iter(batches(3)),  # read once: the search keeps its batches
        accuracy_budget="cosine>=0.999", **options,
    )
    assert _precisions(engine) == {"conv1": "int8", SENSITIVE: "fp32", "conv3": "int8"}
    record = engine.manifest[MANIFEST_KEY]
    assert record["pinned"] == [SENSITIVE] and record["candidates"][0] == SENSITIVE
    assert record["met"] and record["values"]["cosine"] >= 0.999
    # as built, 2 builds and a pass over the data to rank, every layer in fp32, 1 bisection step
    assert record["builds"] <= 6
    # on data it never saw: near the budget (its worst sample is another sample than calibration's)
    assert _worst_sample_cosine(engine.run(feed)["y"], reference) >= 0.995


def test_search_reports_the_layers_as_build_takes_them(planted):
    config = BuildConfig(device="cpu", precision="int8", calibration_method="minmax",
                         accuracy_budget="cosine>=0.999")
    found = search_layer_precisions(planted, config, calibration_data=batches(3))
    assert found.met and found.pinned == [SENSITIVE]
    assert found.layer_precision_args() == f"--layer-precision {SENSITIVE}=fp32"
    assert found.to_json()["pinned"] == [SENSITIVE]
    # pinning those layers builds the engine the search found
    pinned = kiln.build(planted, config.replace(accuracy_budget=None, layer_precisions={SENSITIVE: "fp32"}),
                        calibration_data=batches(3))
    feed = batches(1, seed=3)[0]
    np.testing.assert_array_equal(pinned.run(feed)["y"], kiln.Engine(found.data).run(feed)["y"])


def test_budget_already_met_builds_once(planted):
    engine = kiln.build(planted, device="cpu", precision="fp16", accuracy_budget="cosine>=0.99")
    record = engine.manifest[MANIFEST_KEY]
    assert record["pinned"] == [] and record["builds"] == 1
    assert {p for p in _precisions(engine).values()} == {"fp16"}


def test_unreachable_budget_names_the_layers_and_the_closest_value(planted):
    # kiln's fp32 convolutions and ONNX Runtime's differ by ~1e-6: even all-fp32 misses this
    with pytest.raises(BuildError) as caught:
        kiln.build(planted, device="cpu", precision="int8", calibration_method="minmax",
                   calibration_data=batches(3), accuracy_budget="max_abs<=1e-9")
    message = str(caught.value)
    assert "misses the accuracy budget max_abs<=1e-09 even with all 3 layers" in message
    assert all(name in message for name in ("conv1", "conv2", "conv3"))
    closest = float(message.rsplit("max_abs ", 1)[1])
    assert 0 < closest < 1e-4


def test_budget_on_a_metric_the_outputs_lack(planted):
    with pytest.raises(ConfigError, match=r"bounds top1, which only outputs shaped like class scores"):
        kiln.build(planted, device="cpu", precision="fp16", accuracy_budget="top1>=0.9")


# --- best ----------------------------------------------------------------------------------------

def test_best_on_cpu_times_bf16_and_fp32():
    engine = kiln.build(mlp(), device="cpu", precision="best", accuracy_budget="cosine>=0.99")
    record = engine.manifest[MANIFEST_KEY]
    tried = {entry["precision"]: entry for entry in record["best"]}
    assert list(tried) == ["bf16", "fp32"]  # int8/fp8 are emulated on the CPU, fp16 slow
    assert tried["bf16"]["met"] and tried["bf16"]["ms"] > 0
    chosen = record["precision"]
    assert engine.manifest["precision"] == chosen in ("bf16", "fp32")
    # the chosen one was the faster of those timed
    timed = {p: e["ms"] for p, e in tried.items() if "skipped" not in e}
    assert chosen == min(timed, key=timed.get)
    assert record["values"]["cosine"] >= 0.99


def test_best_skips_a_precision_that_needs_every_layer_in_fp32():
    engine = kiln.build(mlp(), device="cpu", precision="best", accuracy_budget="max_abs<=1e-5")
    record = engine.manifest[MANIFEST_KEY]
    assert record["precision"] == engine.manifest["precision"] == "fp32"
    bf16 = record["best"][0]
    assert bf16["precision"] == "bf16" and bf16["skipped"] == (
        "meets the budget only with every narrowed layer in fp32"
    )


# --- fp16 range ----------------------------------------------------------------------------------

def test_fp16_keeps_layers_beyond_its_range_in_fp32():
    model = conv_chain(outlier_scale=2e4)
    feed = batches(1, seed=5)[0]
    reference = _onnxruntime(model, feed)
    assert np.abs(reference).max() < 100  # the model's result is ordinary; conv1's is not
    plain = kiln.build(model, device="cpu", precision="fp16")
    assert not np.isfinite(plain.run(feed)["y"]).all()

    events = []
    engine = kiln.build(model, device="cpu", precision="fp16", calibration_data=batches(2),
                        progress=events.append)
    # conv1 writes values beyond fp16's range (its weights fit), conv2 reads them
    assert _precisions(engine) == {"conv1": "fp32", "conv2": "fp32", "conv3": "fp16"}
    overflow = engine.manifest["build"]["fp16_overflow"]
    assert set(overflow) == {"conv1", "conv2"} and min(overflow.values()) > 65504 / 2
    [end] = [e for e in events if e.phase == "fp16 range" and e.state == "end"]
    assert end.detail == "2 layer(s) kept in fp32: conv1, conv2"
    ours = engine.run(feed)["y"]
    assert np.abs(ours - reference).max() <= 1e-2 * np.abs(reference).max()

    # a budget search at fp16 starts from the same fallback: it holds with nothing more pinned
    searched = kiln.build(model, device="cpu", precision="fp16", calibration_data=batches(2),
                          accuracy_budget="cosine>=0.999")
    assert searched.manifest[MANIFEST_KEY]["pinned"] == []
    assert _precisions(searched) == _precisions(engine)


def test_fp16_within_range_changes_nothing(planted):
    events = []
    engine = kiln.build(planted, device="cpu", precision="fp16", calibration_data=batches(2),
                        progress=events.append)
    assert "fp16_overflow" not in engine.manifest["build"]
    assert set(_precisions(engine).values()) == {"fp16"}
    [end] = [e for e in events if e.phase == "fp16 range" and e.state == "end"]
    assert end.detail == "every activation within fp16's range"
