"""Exported models shared by the whole-model tests (exported once per session)."""

from __future__ import annotations

import pytest
import torch

from tests.models import zoo


@pytest.fixture(scope="session")
def resnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.ResNet()
    _randomize_batchnorm(model)
    return zoo.export(model, (torch.randn(2, 3, 64, 64),), tmp_path_factory.mktemp("resnet") / "resnet.onnx",
                      ["image"], {"image": {0: "batch", 2: "height", 3: "width"}})


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.BertEncoder()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    return zoo.export(model, (ids, mask), tmp_path_factory.mktemp("bert") / "bert.onnx",
                      ["input_ids", "attention_mask"],
                      {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so a wrong BatchNorm shows in the numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
