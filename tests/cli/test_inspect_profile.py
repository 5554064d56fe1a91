"""kiln inspect --profile / --plot: per-layer times from the runtime's timing hook, drawn."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

import kiln
from kiln.cli.main import main
from kiln.cli.plot import top_layers
from kiln.runtime.timing import COMPUTE, DEVICE_TO_HOST, HOST_TO_DEVICE
from tests.graphs import mlp

MANY = 40


def many_layers() -> onnx.ModelProto:
    """A chain of MANY unary layers: more than a plot shows one by one."""
    ops = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Exp", "Sqrt", "Sin"]
    nodes, value = [], "x"
    for i in range(MANY):
        op = ops[i % len(ops)]
        nodes.append(helper.make_node(op, [value], [f"v{i}"], name=f"a_rather_long_layer_name_{op.lower()}_{i}"))
        value = f"v{i}"
    graph = helper.make_graph(
        nodes, "many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["n", 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def engine_file(tmp_path):
    path = tmp_path / "many.kiln"
    kiln.build(many_layers(), device="cpu", opt_level=0).save(path)  # a layer per node
    return path


def test_profile_json_times_every_layer_in_order(engine_file, capsys):
    args = ["inspect", str(engine_file), "--profile", "--json", "--iterations", "3", "--shapes", "x:16x64"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    profile = info["profile"]
    assert profile["iterations"] == 3 and profile["inputs"] == {"x": [16, 64]}
    assert [layer["name"] for layer in profile["layers"]] == [layer["name"] for layer in info["layers"]]
    assert all(layer["ms"] >= 0 for layer in profile["layers"])
    assert sum(layer["share"] for layer in profile["layers"]) == pytest.approx(1.0, abs=1e-4)
    assert profile["total_ms"] == pytest.approx(sum(layer["ms"] for layer in profile["layers"]), rel=1e-4)


def test_profile_table_shows_the_slowest_and_other(engine_file, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # long layer names stay on one line
    assert main(["inspect", str(engine_file), "--profile", "--iterations", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "layer profile" in out and f"{MANY - 5} other layers" in out


def test_plot_png_is_a_readable_picture(engine_file, tmp_path):
    png = tmp_path / "profile.png"
    assert main(["inspect", str(engine_file), "--plot", str(png), "--iterations", "2", "--top", "12"]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800 and 400 <= height <= 1000  # 13 bars: tall enough to read, not a poster
        # Not blank: bars in colour over the white background.
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20


def test_plot_html(engine_file, tmp_path):
    page = tmp_path / "profile.html"
    assert main(["inspect", str(engine_file), "--plot", str(page), "--iterations", "2", "--top", "3"]) == 0
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "a_rather_long_layer_name_relu_0" in text
    assert f"{MANY - 3} other layers" in text


def test_plot_of_another_format_is_an_error(engine_file, tmp_path, capsys):
    assert main(["inspect", str(engine_file), "--plot", str(tmp_path / "p.svgz"), "--iterations", "1"]) == 1
    assert ".png or .html" in capsys.readouterr().err


def test_top_layers_sums_the_rest_as_other():
    layers = [{"name": f"l{i}", "op": "Relu", "precision": "fp32", "ms": float(i), "share": i / 10} for i in range(5)]
    rows = top_layers(layers, 2)
    assert [row["name"] for row in rows] == ["l4", "l3", "3 other layers"]
    assert rows[-1]["ms"] == 3.0 and rows[-1]["share"] == pytest.approx(0.3)


def test_timeline_marks_each_layer_between_the_copies():
    engine = kiln.build(mlp(), device="cpu", opt_level=0)
    timeline = kiln.Timeline("cpu", layers=True)
    engine.run({"x": np.ones((2, 4), np.float32)}, timeline)
    engine.run({"x": np.ones((2, 4), np.float32)})  # an untimed run leaves no marks
    [run] = timeline.runs()
    labels = [span.label for span in run]
    assert labels == [HOST_TO_DEVICE, "matmul", "bias", "relu", "residual", COMPUTE, DEVICE_TO_HOST]
    assert all(span.seconds >= 0 and span.seconds == span.host_seconds for span in run)
