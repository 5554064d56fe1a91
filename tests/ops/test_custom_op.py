"""kiln.custom_op: ONNX nodes kiln does not know, implemented in Python, built and run by engines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.cli.main import main
from kiln.errors import ConfigError, UnsupportedOpError
from kiln.ops import custom, registry
from kiln.frontend import load_onnx
from kiln.ops.custom import custom_shape
from kiln.passes.pipeline import optimize

DOMAIN = "kiln.test"


def swish_model() -> onnx.ModelProto:
    """y = swish(relu(x), beta=2) + x, swish being the custom op kiln.test::Swish."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Swish", ["r"], ["s"], name="swish", domain=DOMAIN, beta=2.0),
            helper.make_node("Add", ["s", "x"], ["y"], name="residual"),
        ],
        "swish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )


def swish_reference(x: np.ndarray) -> np.ndarray:
    r = np.maximum(x, 0)
    return r / (1 + np.exp(-2 * r)) + x


def register_swish(**options):
    @kiln.custom_op(DOMAIN, "Swish", **options)
    def swish(x, *, beta=1.0):
        return x * torch.sigmoid(beta * x)

    return swish


def isolate_registrations(patch: pytest.MonkeyPatch) -> None:
    """Registrations made under ``patch`` are gone when it is undone."""
    patch.setattr(registry, "_REGISTRY", {key: list(v) for key, v in registry._REGISTRY.items()})
    patch.setattr(custom, "_CUSTOM_OPS", set(custom._CUSTOM_OPS))
    patch.setattr(custom, "_SHAPES", dict(custom._SHAPES))


@pytest.fixture
def isolated(monkeypatch):
    isolate_registrations(monkeypatch)


def assert_swish(engine: kiln.Engine, x: np.ndarray) -> None:
    np.testing.assert_allclose(engine.run({"x": x})["y"], swish_reference(x), rtol=1e-5, atol=1e-6)


def test_registered_custom_op_builds_and_runs_on_cpu(isolated):
    register_swish()
    engine = kiln.build(swish_model(), device="cpu")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert_swish(engine, x)
    assert [layer["custom"] for layer in engine.layers] == [False, True, False]
    assert engine.manifest["custom_ops"] == [{"domain": DOMAIN, "op": "Swish", "opset": 1}]


def test_build_without_registration_fails_naming_kiln_custom_op(isolated):
    expected = r"kiln\.test::Swish.*@kiln\.custom_op\('kiln\.test', 'Swish'\)"
    with pytest.raises(UnsupportedOpError, match=expected):
        kiln.build(swish_model(), device="cpu")


def test_registering_again_replaces_the_implementation(isolated):
    @kiln.custom_op(DOMAIN, "Swish")
    def wrong(x, *, beta=1.0):
        return torch.zeros_like(x)

    register_swish()  # a notebook cell, fixed and re-run
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    assert_swish(kiln.build(swish_model(), device="cpu"), x)


def test_loading_needs_the_op_registered_in_the_loading_process(tmp_path, monkeypatch):
    path = tmp_path / "swish.kiln"
    with monkeypatch.context() as patch:
        isolate_registrations(patch)
        register_swish()
        kiln.build(swish_model(), device="cpu").save(path)
    with pytest.raises(UnsupportedOpError, match=r"kiln\.test::Swish.*kiln\.custom_op"):
        kiln.load(path)
    isolate_registrations(monkeypatch)
    register_swish()
    x = np.ones((1, 4), np.float32)
    assert_swish(kiln.load(path), x)


def test_inspect_marks_custom_layers_and_lists_custom_ops(isolated, tmp_path, capsys):
    register_swish()
    kiln.build(swish_model(), device="cpu").save(tmp_path / "swish.kiln")
    assert main(["inspect", str(tmp_path / "swish.kiln"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["custom_ops"] == [{"domain": DOMAIN, "op": "Swish", "opset": 1}]
    assert [(layer["op"], layer["custom"]) for layer in info["layers"]] == [
        ("Relu", False), (f"{DOMAIN}::Swish", True), ("Add", False),
    ]


def test_triton_implementation_runs_only_on_cuda(isolated):
    devices = []

    def on_gpu(x, *, beta=1.0, _device):
        devices.append(_device)
        return x * torch.sigmoid(beta * x)

    register_swish(triton=on_gpu)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    assert_swish(kiln.build(swish_model(), device="cpu"), x)
    assert devices == []


@pytest.mark.gpu
def test_triton_implementation_runs_on_cuda(isolated):
    devices = []

    def on_gpu(x, *, beta=1.0, _device):
        devices.append(torch.device(_device).type)
        return x * torch.sigmoid(beta * x)

    register_swish(triton=on_gpu)
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    assert_swish(kiln.build(swish_model(), device="cuda"), x)
    assert devices and set(devices) == {"cuda"}


def test_shape_function_is_kept_for_shape_inference(isolated):
    register_swish(shape=lambda x, **attributes: x)
    assert custom_shape(DOMAIN, "Swish")((3, "batch"), beta=2.0) == (3, "batch")
    register_swish()
    assert custom_shape(DOMAIN, "Swish") is None


def test_shape_function_drives_symbolic_shape_inference(isolated):
    @kiln.custom_op(DOMAIN, "Stack2", shape=lambda x: (x[0], x[1] * 2 if isinstance(x[1], int) else None))
    def stack2(x):
        return torch.cat([x, x], dim=-1)

    graph = helper.make_graph(
        [helper.make_node("Stack2", ["x"], ["doubled"], domain=DOMAIN),
         helper.make_node("Relu", ["doubled"], ["y"])],
        "stack2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    inferred, _ = optimize(load_onnx(model), opt_level=1)
    doubled = next(n for n in inferred.graph if n.op_type == "Stack2").outputs[0]
    assert [d if isinstance(d, int) else d.value for d in doubled.shape] == ["batch", 8]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(kiln.build(model, device="cpu").run({"x": x})["y"], np.maximum(np.concatenate([x, x], -1), 0))


@pytest.mark.parametrize("domain, op_type, message", [
    ("", "Relu", "already implements"),
    ("kiln", "Swish", "fused ops"),
])
def test_custom_ops_cannot_take_the_place_of_kiln_ops(isolated, domain, op_type, message):
    with pytest.raises(ConfigError, match=message):
        kiln.custom_op(domain, op_type)
