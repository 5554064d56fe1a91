"""torch.compile(model, backend="kiln"): graphs run in kiln, what kiln cannot take in PyTorch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils import _pytree as pytree


@torch.library.custom_op("kiln_test_dynamo::untranslated", mutates_args=())
def untranslated(x: torch.Tensor) -> torch.Tensor:
    """A torch op the ONNX exporters cannot translate."""
    return x.sin() * 2


@untranslated.register_fake
def _(x):
    return torch.empty_like(x)


class ConvBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.norm(self.conv(x)))
        return {"features": y, "pooled": y.mean((2, 3))}


class WithUntranslatedOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 8)
        self.second = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.second(untranslated(torch.relu(self.first(x))))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no graph compiled by another test is reused
    yield
    torch._dynamo.reset()


def assert_matches(actual, expected):
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    assert actual_spec == expected_spec
    for a, e in zip(actual_leaves, expected_leaves):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_supported_module_runs_in_kiln(caplog):
    torch.manual_seed(0)
    model = ConvBlock().eval()
    model.norm.running_mean.uniform_(-0.5, 0.5)
    compiled = torch.compile(model, backend="kiln")
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="kiln.dynamo"):
        actual = compiled(x)
        again = compiled(x)
    with torch.no_grad():
        expected = model(x)
    assert_matches(actual, expected)
    assert_matches(again, expected)
    assert caplog.text.count("runs in kiln") == 1  # built once, reused for the same signature
    assert "runs in PyTorch" not in caplog.text


def test_untranslatable_op_runs_in_pytorch_and_the_rest_in_kiln(caplog):
    torch.manual_seed(0)
    model = WithUntranslatedOp().eval()
    compiled = torch.compile(model, backend="kiln")
    x = torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="kiln.dynamo"), torch.no_grad():
        actual = compiled(x)
        expected = model(x)
    assert_matches(actual, expected)
    assert "cannot translate kiln_test_dynamo.untranslated.default" in caplog.text
    assert "runs in kiln" in caplog.text  # the Linear and ReLU before the op


def test_graph_kiln_cannot_build_runs_in_pytorch(monkeypatch, caplog):
    import kiln
    from kiln.errors import UnsupportedOpError

    def unsupported(*args, **kwargs):
        raise UnsupportedOpError("node 'n': operator ai.onnx::Imaginary (opset 18) is not implemented")

    monkeypatch.setattr(kiln, "compile", unsupported)
    model = ConvBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="kiln.dynamo"), torch.no_grad():
        assert_matches(torch.compile(model, backend="kiln")(x), model(x))
    assert "runs in PyTorch: node 'n': operator ai.onnx::Imaginary" in caplog.text


def test_misspelled_option_fails_at_compile_time():
    from kiln.dynamo import kiln_backend
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="opt_levle"):
        kiln_backend(torch.fx.symbolic_trace(ConvBlock()), [], options={"opt_levle": 2})


@pytest.mark.gpu
def test_cuda_graph_runs_in_kiln_on_cuda(caplog):
    torch.manual_seed(0)
    model = ConvBlock().eval().cuda()
    compiled = torch.compile(model, backend="kiln")
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with caplog.at_level(logging.INFO, logger="kiln.dynamo"), torch.no_grad():
        actual = compiled(x)
        expected = model(x)
    assert_matches(actual, expected)
    assert "runs in kiln" in caplog.text and "on cuda" in caplog.text
