"""Whole models against ONNX Runtime in fp32, at several shapes, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import kiln

MAX_RELATIVE_ERROR = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max() / scale)


def assert_matches_onnxruntime(model_path, engine: kiln.Engine, inputs: dict) -> None:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, inputs)
    actual = engine.run(inputs)
    assert list(actual) == [o.name for o in session.get_outputs()]
    for (name, value), reference in zip(actual.items(), expected):
        assert value.shape == reference.shape, name
        assert value.dtype == reference.dtype, name
        assert relative_error(value, reference) <= MAX_RELATIVE_ERROR, name


@pytest.mark.parametrize("batch,size", [(1, 64), (3, 64), (2, 96)])
def test_resnet_matches_onnxruntime(resnet_onnx, batch, size):
    engine = kiln.build(resnet_onnx, device="cpu")
    rng = np.random.default_rng(batch * 1000 + size)
    image = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    assert_matches_onnxruntime(resnet_onnx, engine, {"image": image})


@pytest.mark.parametrize("batch,seq", [(1, 8), (4, 16), (2, 33)])
def test_bert_matches_onnxruntime(bert_onnx, batch, seq):
    engine = kiln.build(bert_onnx, device="cpu")
    assert [i.shape for i in engine.inputs] == [("batch", "seq"), ("batch", "seq")]
    rng = np.random.default_rng(batch * 100 + seq)
    ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0  # padding in the first sequence
    assert_matches_onnxruntime(bert_onnx, engine, {"input_ids": ids, "attention_mask": mask})


def test_saved_engine_gives_the_same_outputs(bert_onnx, tmp_path):
    engine = kiln.build(bert_onnx, device="cpu")
    engine.save(tmp_path / "bert.kiln")
    loaded = kiln.load(tmp_path / "bert.kiln")
    rng = np.random.default_rng(7)
    inputs = {"input_ids": rng.integers(0, 1000, (2, 12)), "attention_mask": np.ones((2, 12), np.int64)}
    for name, value in engine.run(inputs).items():
        np.testing.assert_array_equal(loaded.run(inputs)[name], value)
