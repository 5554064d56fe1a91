"""Whole models on the GPU against ONNX Runtime (CPU) in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from tests.models.test_whole_models import assert_matches_onnxruntime

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch,size", [(1, 64), (4, 96)])
def test_resnet_on_cuda(resnet_onnx, batch, size):
    engine = kiln.build(resnet_onnx, device="cuda")
    image = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    # cuDNN may pick TF32-free but differently ordered algorithms: same 1e-4 budget as the CPU.
    assert_matches_onnxruntime(resnet_onnx, engine, {"image": image})


@pytest.mark.parametrize("batch,seq", [(1, 8), (4, 33)])
def test_bert_on_cuda(bert_onnx, batch, seq):
    engine = kiln.build(bert_onnx, device="cuda")
    rng = np.random.default_rng(seq)
    ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0
    assert_matches_onnxruntime(bert_onnx, engine, {"input_ids": ids, "attention_mask": mask})


def test_gpu_tensors_stay_on_the_gpu(bert_onnx):
    engine = kiln.build(bert_onnx, device="cuda")
    ids = torch.randint(0, 1000, (2, 8), device="cuda")
    mask = torch.ones(2, 8, dtype=torch.int64, device="cuda")
    outputs = engine.run({"input_ids": ids, "attention_mask": mask})
    assert all(v.is_cuda for v in outputs.values())
    on_host = engine.run({"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})
    for name, value in outputs.items():
        np.testing.assert_allclose(value.cpu().numpy(), on_host[name], rtol=1e-5, atol=1e-6)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tuned_reduced_precision_models_pick_library_kernels(resnet_onnx, bert_onnx, precision, tmp_path):
    cache = tmp_path / "timings.json"
    rng = np.random.default_rng(5)
    image = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    ids = rng.integers(0, 1000, (2, 16)).astype(np.int64)
    bert_feed = {"input_ids": ids, "attention_mask": np.ones((2, 16), np.int64)}
    for path, feed, library in [
        (resnet_onnx, {"image": image}, "cudnn-conv"),
        (bert_onnx, bert_feed, "cublaslt-gemm"),
    ]:
        engine = kiln.build(path, device="cuda", precision=precision, timing_cache=str(cache),
                            profiles=[kiln.Profile({n: v.shape for n, v in feed.items()})])
        choices = {layer["choice"] for layer in engine.layers}
        assert any(c.startswith(library) for c in choices), choices
        assert any(layer["timed_ms"] for layer in engine.layers)
        reference = kiln.build(path, device="cuda").run(feed)
        for _ in range(3):  # eager, capture, replay
            outputs = engine.run(feed)
            for name, value in outputs.items():
                assert _cosine(value, reference[name]) >= 0.999, name
    assert cache.exists()
    again = kiln.build(resnet_onnx, device="cuda", precision=precision, timing_cache=str(cache),
                       profiles=[kiln.Profile({"image": image.shape})])
    assert again.manifest["build"]["tuning"]["cache_hits"] > 0
