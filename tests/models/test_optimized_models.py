"""The graph optimizer on the models people deploy: ResNet-50, BERT-base, ViT-B/16, GPT-2 small.

Shapes are the real ones (random weights). Each is exported from torch, built at the default
level on the CPU, checked for the fusions the issue asks for, and compared with ONNX Runtime on
the unoptimized model at two shapes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import kiln
from tests.models import zoo
from tests.models.test_whole_models import assert_matches_onnxruntime

pytestmark = pytest.mark.slow
LAYERS = 12


def _export(tmp_path_factory, name, model, example, inputs, dynamic):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    return zoo.export(model, example, path, inputs, dynamic)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.ResNet50()
    zoo.randomize_batchnorm(model)
    return _export(tmp_path_factory, "resnet50", model, (torch.randn(1, 3, 224, 224),), ["image"],
                   {"image": {0: "batch"}})


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    model = zoo.BertEncoder(vocab=30522, hidden=768, heads=12, layers=LAYERS, max_positions=512)
    ids, mask = torch.randint(0, 30522, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return _export(tmp_path_factory, "bert", model, (ids, mask), ["input_ids", "attention_mask"], dims)


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    return _export(tmp_path_factory, "vit", zoo.ViT(), (torch.randn(1, 3, 224, 224),), ["image"],
                   {"image": {0: "batch"}})


@pytest.fixture(scope="module")
def gpt2_small(tmp_path_factory):
    return _export(tmp_path_factory, "gpt2", zoo.GPT2(), (torch.randint(0, 50257, (1, 16)),),
                   ["input_ids"], {"input_ids": {0: "batch", 1: "seq"}})


def _ops(engine: kiln.Engine) -> Counter:
    return Counter(layer["op"] for layer in engine.layers)


def _onnx_nodes(path) -> int:
    return len(onnx.load(path, load_external_data=False).graph.node)


def _images(batch: int, seed: int) -> dict:
    return {"image": np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)}


def _tokens(batch: int, seq: int, vocab: int, seed: int, mask: bool) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64)}
    if mask:
        inputs["attention_mask"] = np.ones((batch, seq), np.int64)
        inputs["attention_mask"][-1, seq // 3 :] = 0
    return inputs


def _assert_transformer_fused(engine: kiln.Engine, onnx_nodes: int) -> None:
    ops = _ops(engine)
    assert ops["kiln::Attention"] == LAYERS, ops
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["Tanh"] == 0 and ops["Pow"] == 0, ops
    assert ops["kiln::LayerNorm"] == 2 * LAYERS + 1, ops
    assert ops["ReduceMean"] == 0, ops
    assert ops["SplitToSequence"] == 0 and ops["SequenceAt"] == 0, ops
    assert len(engine.layers) * 5 <= onnx_nodes, (len(engine.layers), onnx_nodes, ops)


def test_resnet50(resnet50):
    engine = kiln.build(resnet50, device="cpu")
    ops = _ops(engine)
    assert ops["kiln::FusedConv"] + ops["Conv"] == 53, ops  # a shortcut conv feeding a residual stays bare
    for absorbed in ("BatchNormalization", "Relu", "Add"):
        assert ops[absorbed] == 0, ops
    residual = [layer for layer in engine.layers if "Add" in layer["source_ops"]]
    assert len(residual) == 16 and all("BatchNormalization" in l["source_ops"] for l in residual)
    for batch, seed in ((1, 0), (3, 1)):
        assert_matches_onnxruntime(resnet50, engine, _images(batch, seed))


def test_bert_base(bert_base):
    engine = kiln.build(bert_base, device="cpu")
    _assert_transformer_fused(engine, _onnx_nodes(bert_base))
    assert engine.manifest["build"]["seconds"] < 10
    for batch, seq, seed in ((1, 16, 0), (4, 37, 1)):
        assert_matches_onnxruntime(bert_base, engine, _tokens(batch, seq, 30522, seed, mask=True))


def test_vit_b16(vit_b16):
    engine = kiln.build(vit_b16, device="cpu")
    _assert_transformer_fused(engine, _onnx_nodes(vit_b16))
    for batch, seed in ((1, 0), (2, 1)):
        assert_matches_onnxruntime(vit_b16, engine, _images(batch, seed))


def test_gpt2_small(gpt2_small):
    engine = kiln.build(gpt2_small, device="cpu")
    _assert_transformer_fused(engine, _onnx_nodes(gpt2_small))
    attention = [layer for layer in engine.layers if layer["op"] == "kiln::Attention"]
    assert all("Softmax" in layer["source_ops"] for layer in attention)
    for batch, seq, seed in ((1, 16, 0), (2, 41, 1)):
        assert_matches_onnxruntime(gpt2_small, engine, _tokens(batch, seq, 50257, seed, mask=False))


def test_level_0_fuses_nothing_and_gives_the_same_numbers(bert_base):
    engine = kiln.build(bert_base, device="cpu", opt_level=0)
    assert not any(layer["op"].startswith("kiln::") for layer in engine.layers)
    assert len(engine.layers) == _onnx_nodes(bert_base)
    assert_matches_onnxruntime(bert_base, engine, _tokens(2, 9, 30522, 5, mask=True))
