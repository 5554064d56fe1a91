"""CUDA graphs: replays give what eager runs give, per shape signature, on any stream."""

from __future__ import annotations

import logging
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from tests.models.test_whole_models import assert_matches_onnxruntime

pytestmark = pytest.mark.gpu


def _first_output(outputs):
    return next(iter(outputs.values()))


def _bert_feed(rng, batch, seq):
    ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_replays_match_eager_runs_across_shapes(bert_onnx, precision):
    engine = kiln.build(bert_onnx, device="cuda", precision=precision)
    eager = kiln.runtime.from_bytes(engine.to_bytes(), cuda_graphs=False)
    rng = np.random.default_rng(0)
    for batch, seq in [(2, 16), (2, 16), (2, 16), (3, 9), (3, 9), (3, 9), (2, 16)]:
        feed = _bert_feed(rng, batch, seq)
        replayed, expected = engine.run(feed), eager.run(feed)
        for name in expected:
            np.testing.assert_allclose(replayed[name], expected[name], rtol=1e-5, atol=1e-5)
    assert engine.captured_signatures == 2  # shape arithmetic stayed on the host: both captured


def test_replayed_outputs_are_not_overwritten_by_the_next_run(resnet_onnx):
    engine = kiln.build(resnet_onnx, device="cuda")
    images = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(4)]
    outputs = [_first_output(engine.run({"image": image})) for image in images]
    eager = kiln.runtime.from_bytes(engine.to_bytes(), cuda_graphs=False)
    again = [_first_output(eager.run({"image": image})) for image in images]
    for got, expected in zip(outputs, again):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert engine.captured_signatures == 1


def test_resnet_replays_match_onnxruntime(resnet_onnx):
    engine = kiln.build(resnet_onnx, device="cuda")
    rng = np.random.default_rng(1)
    for _ in range(3):
        image = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
        assert_matches_onnxruntime(resnet_onnx, engine, {"image": image})


def _nonzero_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, "nonzero"])
    nodes = [helper.make_node("NonZero", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "nonzero", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_signature_that_cannot_be_captured_runs_eagerly(caplog):
    engine = kiln.build(_nonzero_model(), device="cuda")
    x = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    with caplog.at_level(logging.WARNING, logger="kiln.runtime"):
        results = [engine.run({"x": x * k})["y"] for k in (1, 1, 1)]
    for result in results:
        np.testing.assert_array_equal(result, [[1, 3]])
    assert "capture failed" in caplog.text
    assert engine.captured_signatures == 0


def test_contexts_capture_and_run_concurrently_on_their_own_streams(bert_onnx, caplog):
    engine = kiln.build(bert_onnx, device="cuda", precision="fp16")
    rng = np.random.default_rng(2)
    feeds = [_bert_feed(rng, 2, 16) for _ in range(4)]
    expected = [_first_output(engine.run(feed)) for feed in feeds]
    contexts = [engine.create_context() for _ in feeds]
    start = threading.Barrier(len(feeds))  # the captures of all threads overlap
    errors = []

    def worker(index):
        stream = torch.cuda.Stream()
        start.wait()
        try:
            for _ in range(5):
                got = _first_output(contexts[index].run(feeds[index], stream=stream))
                if not np.allclose(got, expected[index], rtol=1e-3, atol=1e-3):
                    errors.append(f"context {index}: wrong output")
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(f"context {index}: {error!r}")

    with caplog.at_level(logging.WARNING, logger="kiln.runtime"):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(feeds))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert "capture failed" not in caplog.text
    assert [context.captured_signatures for context in contexts] == [1] * len(feeds)


def test_no_cuda_graph_engines_never_capture(resnet_onnx, tmp_path):
    path = tmp_path / "resnet.kiln"
    kiln.build(resnet_onnx, device="cuda").save(path)
    engine = kiln.load(path, cuda_graphs=False)
    for _ in range(3):
        engine.run({"image": torch.randn(1, 3, 64, 64, device="cuda")})
    assert engine.captured_signatures == 0
