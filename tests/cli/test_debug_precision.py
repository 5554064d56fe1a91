"""``kiln debug precision`` and ``kiln build --accuracy-budget``: the layers to keep in fp32,
printed as ``kiln build`` takes them or as JSON; an unreachable budget is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from kiln.cli.main import main
from tests.precision_graphs import SENSITIVE, batches, conv_chain


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    onnx.save(conv_chain(outlier_scale=1000.0), folder / "chain.onnx")
    data = folder / "calibration"
    data.mkdir()
    for index, batch in enumerate(batches(3)):
        np.savez(data / f"batch{index}.npz", **batch)
    return folder / "chain.onnx", data


def _search(planted, *extra):
    model, data = planted
    return ["debug", "precision", str(model), "--precision", "int8", "--device", "cpu",
            "--calibration-data", str(data), "--calibration-method", "minmax", *extra]


def _layers(engine_file, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert main(["inspect", str(engine_file), "--json"]) == 0
    return {layer["name"]: layer["precision"] for layer in json.loads(capsys.readouterr().out)["layers"]}


def test_prints_the_layers_to_keep_as_build_flags(planted, capsys):
    assert main(_search(planted, "--budget", "cosine>=0.999")) == 0
    captured = capsys.readouterr()
    assert captured.out == f"--layer-precision {SENSITIVE}=fp32\n"
    assert "int8 meets cosine>=0.999 with 1 of 3 layers in fp32 (cosine 0.99" in captured.err


def test_json(planted, capsys):
    assert main(_search(planted, "--budget", "cosine>=0.999", "--json")) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["met"] is True and found["precision"] == "int8"
    assert found["pinned"] == [SENSITIVE] and sorted(found["candidates"]) == ["conv1", "conv2", "conv3"]
    assert found["layer_precision_args"] == f"--layer-precision {SENSITIVE}=fp32"
    assert found["values"]["cosine"] >= 0.999 and found["builds"] >= 4


def test_unreachable_budget_exits_1_with_one_line(planted, capsys):
    assert main(_search(planted, "--budget", "max_abs<=1e-9")) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "Traceback" not in err
    assert err.startswith("kiln debug: error: the int8 engine misses the accuracy budget max_abs<=1e-09")
    assert "conv1" in err and "closest it comes is max_abs" in err
    # --json still says what was found
    assert main(_search(planted, "--budget", "max_abs<=1e-9", "--json")) == 1
    found = json.loads(capsys.readouterr().out)
    assert found["met"] is False and found["pinned"] == [] and found["values"]["max_abs"] > 1e-9


def test_malformed_budget_is_one_line(planted, capsys):
    assert main(_search(planted, "--budget", "cosine=0.999")) == 1
    err = capsys.readouterr().err.strip()
    assert "'cosine=0.999' is not METRIC>=X or METRIC<=X" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:  # a precision it cannot search is a usage error
        main([*_search(planted, "--budget", "cosine>=0.9"), "--precision", "fp32"])
    assert exit_.value.code == 2


def test_build_with_an_accuracy_budget(planted, tmp_path, capsys):
    model, data = planted
    engine_file = tmp_path / "chain.kiln"
    assert main(["build", str(model), "-o", str(engine_file), "--device", "cpu", "--precision",
                 "int8", "--calibration-data", str(data), "--calibration-method", "minmax",
                 "--accuracy-budget", "cosine>=0.999", "--log-json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measured = [e["detail"] for e in events if e["phase"] == "budget" and e["state"] == "advance"]
    assert measured[0].startswith("int8: cosine") and "misses cosine>=0.999" in measured[0]
    assert _layers(engine_file, capsys) == {"conv1": "int8", SENSITIVE: "fp32", "conv3": "int8"}


def test_build_best_without_a_budget_is_one_line(planted, tmp_path, capsys):
    model, _ = planted
    assert main(["build", str(model), "-o", str(tmp_path / "e.kiln"), "--device", "cpu",
                 "--precision", "best", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "precision 'best'" in err and "--accuracy-budget" in err and "\n" not in err


def test_fp16_build_with_calibration_data_keeps_overflowing_layers_fp32(tmp_path, capsys):
    onnx.save(conv_chain(outlier_scale=2e4), tmp_path / "wide.onnx")
    data = tmp_path / "calibration"
    data.mkdir()
    np.savez(data / "batch.npz", **batches(1)[0])
    engine_file = tmp_path / "wide.kiln"
    assert main(["build", str(tmp_path / "wide.onnx"), "-o", str(engine_file), "--device", "cpu",
                 "--precision", "fp16", "--calibration-data", str(data), "-q"]) == 0
    layers = _layers(engine_file, capsys)
    assert (layers["conv1"], layers["conv2"], layers["conv3"]) == ("fp32", "fp32", "fp16")
