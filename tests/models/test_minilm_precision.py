"""all-MiniLM-L6-v2 with its real weights in reduced precision: the sentence embeddings of every
sentence of the data file against the FP32 model's (ONNX Runtime), calibrated on other sentences
for int8/fp8. The CPU runs int8 (emulated); the GPU every precision."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from tests.models import minilm

pytestmark = pytest.mark.slow

# What each precision must keep of the embeddings: the cosine of every sentence's embedding to
# its FP32 one, at worst. bf16's 8-bit mantissa keeps 0.99995 overall on an H100 but 0.999895
# for the worst of the 131 sentences, so its floor is 0.9998.
FLOORS = {"fp16": 0.9999, "bf16": 0.9998, "int8": 0.99, "fp8": 0.99}
CALIBRATION = 48  # the first sentences calibrate, in batches of 16; all of them are evaluated


def _fp32_embeddings(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def _calibration_batches():
    tokens = minilm.tokenize(minilm.SENTENCES[:CALIBRATION])
    return [{name: array[i:i + 16] for name, array in tokens.items()} for i in range(0, CALIBRATION, 16)]


def _worst_cosine(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    cosines = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    return float(cosines.min())


def _check(path, device: str, precision: str) -> float:
    inputs = minilm.tokenize(minilm.SENTENCES)
    assert len(minilm.SENTENCES) >= 100
    calibration = _calibration_batches() if precision in ("int8", "fp8") else None
    engine = kiln.build(path, device=device, precision=precision, calibration_data=calibration)
    layers = [layer["precision"] for layer in engine.layers]
    # 6 layers x (Q, K, V or packed QKV, output, two FFN) products
    assert layers.count(precision) >= 24 if precision in ("int8", "fp8") else precision in layers
    ours = engine.run(inputs)[minilm.OUTPUT_NAME]
    reference = _fp32_embeddings(path, inputs)
    report = engine.accuracy_report([inputs], path)[0]
    assert report.samples == len(minilm.SENTENCES)
    assert report.worst_sample_cosine == pytest.approx(_worst_cosine(ours, reference), abs=1e-6)
    assert report.worst_sample_cosine >= FLOORS[precision], report
    return report.worst_sample_cosine


def test_int8_embeddings_on_cpu(minilm_onnx):
    _check(minilm_onnx, "cpu", "int8")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(FLOORS))
def test_reduced_precision_embeddings_on_gpu(minilm_onnx, precision):
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    _check(minilm_onnx, "cuda", precision)
