"""Norms quantizing the rows their INT8/FP8 matrix products read (``NormsQuantizeRows``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln

WIDTH = 32


def _encoder(norm: str = "LayerNormalization", second_reader: bool = False) -> onnx.ModelProto:
    """A post-norm block: h = norm(x); r = h @ w1 + b1 + h; z = norm(r) @ w2 (and, with
    ``second_reader``, h @ w3 too: its own smoothing factors)."""
    rng = np.random.default_rng(0)

    def weight(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    norm_inputs = (lambda i: [f"g{i}"]) if norm == "RMSNormalization" else (lambda i: [f"g{i}", f"b{i}"])
    nodes = [
        helper.make_node(norm, ["x", *norm_inputs(1)], ["h"], axis=-1, name="norm1"),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="product1"),
        helper.make_node("Add", ["a", "bias1"], ["a_b"]),
        helper.make_node("Add", ["a_b", "h"], ["r"]),
        helper.make_node(norm, ["r", *norm_inputs(2)], ["h2"], axis=-1, name="norm2"),
        helper.make_node("MatMul", ["h2", "w2"], ["z"], name="product2"),
    ]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16, 24])]
    initializers = [weight("w1", WIDTH, WIDTH), weight("bias1", WIDTH), weight("w2", WIDTH, 24),
                    weight("g1", WIDTH, scale=1.0), weight("g2", WIDTH, scale=1.0),
                    weight("b1", WIDTH), weight("b2", WIDTH)]
    if second_reader:
        nodes.append(helper.make_node("MatMul", ["h", "w3"], ["u"], name="product3"))
        outputs.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, ["n", 16, 8]))
        initializers.append(weight("w3", WIDTH, 8, scale=3.0))
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, WIDTH])],
        outputs, initializers,
    )
    opset = 23 if norm == "RMSNormalization" else 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((3, 16, WIDTH)).astype(np.float32)
        x[:, :, 5] *= 20  # an outlier channel, as transformers' norms have
        feeds.append({"x": x})
    return feeds


def _build(model: onnx.ModelProto, precision: str, **options) -> kiln.Engine:
    return kiln.build(model, device="cpu", precision=precision, calibration_data=_feeds(2, seed=1),
                      **options)


def _steps(engine: kiln.Engine) -> dict[str, dict]:
    return {step["name"]: step for step in engine.manifest["plan"]["steps"]}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("norm", ["LayerNormalization", "RMSNormalization"])
def test_norms_quantize_the_rows_and_change_no_value(precision, norm):
    model = _encoder(norm)
    engine = _build(model, precision)
    steps = _steps(engine)
    norms = [step for step in steps.values() if step["op"] in ("LayerNorm", "RMSNorm")]
    products = [step for step in steps.values() if step["op"] == "QuantizedMatMul"]
    assert len(norms) == 2 and len(products) == 2
    for norm_step in norms:
        assert norm_step["attributes"]["q_type"]["int"] in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
        assert len(norm_step["outputs"]) == 3  # Y, the rows, their scales
    for product in products:
        assert product["inputs"][0].endswith("_rows") and product["inputs"][-1].endswith("_row_scales")
        assert product["attributes"]["dynamic"]["int"] == 0
    # each product quantizing its input itself (all outputs float: no hand-offs) computes the same
    separate = _build(model, precision, debug_outputs=True)
    assert not any("q_type" in step["attributes"] for step in _steps(separate).values())
    feed = _feeds(1, seed=7)[0]
    np.testing.assert_array_equal(engine.run(feed)["z"], separate.run(feed)["z"])


def test_products_with_other_smoothing_keep_their_own_pass():
    engine = _build(_encoder(second_reader=True), "int8")
    steps = _steps(engine)
    readers = {step["name"]: step for step in steps.values() if step["op"] == "QuantizedMatMul"
               and step["inputs"][0] in ("h", "h_rows")}
    assert sorted(step["attributes"]["dynamic"]["int"] for step in readers.values()) == [0, 1], readers
    feed = _feeds(1, seed=7)[0]
    separate = _build(_encoder(second_reader=True), "int8", debug_outputs=True)
    got, expected = engine.run(feed), separate.run(feed)
    for name in ("z", "u"):
        np.testing.assert_array_equal(got[name], expected[name])
