"""kiln.compile: a PyTorch module in, a module called like the original out, running an engine."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils import _pytree as pytree

import kiln
from kiln.errors import InputError, ModelError
from tests.models import zoo

MAX_RELATIVE_ERROR = 1e-4


@torch.library.custom_op("kiln_test_compile::untranslated", mutates_args=())
def untranslated(x: torch.Tensor) -> torch.Tensor:
    """A torch op neither ONNX exporter can translate."""
    return x.sin() * 2


@untranslated.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("kiln_test_compile::scripted", mutates_args=())
def scripted(x: torch.Tensor) -> torch.Tensor:
    """A torch op only the TorchScript exporter can translate (through a symbolic function)."""
    return x.sin() * 2


@scripted.register_fake
def _(x):
    return torch.empty_like(x)


class Calls(torch.nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(torch.relu(x)) + 1


class DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class Heads(torch.nn.Module):
    """Keyword arguments, a Python constant, and a dict holding a tuple of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        features = torch.relu(self.body(x)) * scale
        if mask is not None:
            features = features * mask
        return {"logits": self.head(features), "pooled": (features.mean(-1), features.amax(-1))}


def assert_matches(actual, expected):
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    assert actual_spec == expected_spec
    for a, e in zip(actual_leaves, expected_leaves):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device
        scale = max(float(e.abs().max()), 1e-30)
        assert float((a - e).abs().max()) / scale <= MAX_RELATIVE_ERROR


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so that a wrongly folded BatchNorm shows in the numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = zoo.ResNet(widths=(8, 16, 16, 16)).eval()
    randomize_batchnorm(model)
    return model, kiln.compile(model, torch.randn(2, 3, 32, 32), dynamic_shapes={"x": {0: "batch"}})


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = zoo.BertEncoder(vocab=100, hidden=32, heads=2, layers=1, max_positions=32).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return model, kiln.compile(model, (ids, mask), dynamic_shapes=dims)


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    model = Heads().eval()
    example = dict(mask=torch.ones(2, 8), scale=0.5)
    return model, kiln.compile(model, torch.randn(2, 6), example_kwargs=example,
                               dynamic_shapes={"x": {0: "batch"}, "mask": {0: "batch"}})


def test_cnn_matches_eager_at_two_batch_sizes(cnn):
    model, compiled = cnn
    assert compiled.engine.inputs[0].shape == ("batch", 3, 32, 32)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert_matches(compiled(x), model(x))


def test_encoder_matches_eager_with_dynamic_batch_and_sequence(encoder):
    model, compiled = encoder
    for batch, seq in ((2, 16), (3, 9)):
        ids = torch.randint(0, 100, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2:] = 0  # padding in the first sequence
        with torch.no_grad():
            expected = model(ids, mask)
        assert_matches(compiled(ids, attention_mask=mask), expected)  # a tuple, keywords allowed


def test_dict_output_keywords_and_constants(heads):
    model, compiled = heads
    x, mask = torch.randn(4, 6), (torch.rand(4, 8) > 0.3).float()
    with torch.no_grad():
        expected = model(x, mask=mask, scale=0.5)
    assert_matches(compiled(x, mask, scale=0.5), expected)
    assert_matches(compiled(mask=mask, x=x, scale=0.5), expected)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x, mask=torch.ones(2, 8), scale=2.0), "compiled with 0.5"),
    (lambda m, x: m(x, scale=0.5), r"passes \(x, scale\)"),
    (lambda m, x: m([x], mask=torch.ones(2, 8), scale=0.5), "nested"),
    (lambda m, x: m(x, mask=torch.ones(2, 8, dtype=torch.float64), scale=0.5), "dtype"),
])
def test_calls_unlike_the_example_are_refused(heads, call, message):
    _, compiled = heads
    with pytest.raises(InputError, match=message):
        call(compiled, torch.randn(2, 6))


def test_saved_module_loads_and_runs_like_the_original(encoder, tmp_path):
    model, compiled = encoder
    compiled.save(tmp_path / "encoder.kiln")
    loaded = kiln.load_module(tmp_path / "encoder.kiln")
    ids, mask = torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.int64)
    with torch.no_grad():
        assert_matches(loaded(ids, mask), model(ids, mask))
    assert kiln.load(tmp_path / "encoder.kiln").inputs == compiled.engine.inputs


@pytest.mark.parametrize("module, message", [
    (Calls(untranslated).eval(), "no translation for operator kiln_test_compile.untranslated.default"),
    (DataDependentBranch().eval(), r"control flow on a tensor's value at .*test_torch_compile.py:\d+ "
                            r"\(`if x.sum\(\) > 0:`\).*torch.where"),
])
def test_export_failures_name_the_operator_or_the_line(module, message):
    with pytest.raises(ModelError, match=message):
        kiln.compile(module, torch.randn(2, 3))


@pytest.fixture
def scripted_symbolic():
    def symbolic(g, x):
        return g.op("Mul", g.op("Sin", x), g.op("Constant", value_t=torch.tensor(2.0)))

    torch.onnx.register_custom_op_symbolic("kiln_test_compile::scripted", symbolic, 17)
    yield
    torch.onnx.unregister_custom_op_symbolic("kiln_test_compile::scripted", 17)


def test_torchscript_exporter_takes_over_with_a_warning(scripted_symbolic, caplog):
    module = Calls(scripted).eval()
    with caplog.at_level(logging.WARNING, logger="kiln.frontend.torch"):
        compiled = kiln.compile(module, torch.randn(2, 3), dynamic_shapes={"x": {0: "batch"}})
    assert "exported it with the TorchScript exporter" in caplog.text
    x = torch.randn(4, 3)
    assert_matches(compiled(x), module(x))


@pytest.mark.gpu
def test_cuda_inputs_build_for_cuda(cnn):
    model = copy.deepcopy(cnn[0]).cuda()
    compiled = kiln.compile(model, torch.randn(2, 3, 32, 32, device="cuda"),
                            dynamic_shapes={"x": {0: "batch"}})
    assert compiled.engine.device.type == "cuda"
    x = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert_matches(compiled(x), model(x))
