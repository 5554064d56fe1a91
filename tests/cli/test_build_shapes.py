"""``kiln build --shapes``: optimization profiles from the command line, shown by ``kiln inspect``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import kiln
from kiln import Profile
from kiln.cli.main import main
from kiln.cli.options import profile_spec
from tests.graphs import mlp, two_inputs


def test_profile_spec():
    assert profile_spec("ids:1x16,8x128,64x512") == Profile({"ids": ((1, 16), (8, 128), (64, 512))})
    assert profile_spec("ids:8x128") == Profile({"ids": (8, 128)})
    assert profile_spec(" a:1x3,2x3,4x3  b:2x3 ") == Profile({"a": ((1, 3), (2, 3), (4, 3)), "b": (2, 3)})
    assert profile_spec("input:0:1x3,2x3,4x3").shapes["input:0"][2] == (4, 3)  # TF-style names


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected NAME:MIN,OPT,MAX"),
        ("ids", "not 'ids'"),
        ("ids:1x16,8x128", "not 'ids:1x16,8x128'"),
        ("ids:1x16,8xa,64x512", "not 'ids:1x16,8xa,64x512'"),
        (":1x16", "not ':1x16'"),
        ("ids:1x16 ids:2x16", "'ids' appears twice"),
        ("ids:64x512,8x128,1x16", "1 <= min <= opt <= max"),
        ("ids:1x16,8x128,64x512x2", "same rank"),
    ],
)
def test_bad_profile_spec(spec, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        profile_spec(spec)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_inputs(), path)
    return path


def test_build_with_two_profiles_then_inspect(model_file, tmp_path, capsys):
    engine_file = tmp_path / "two.kiln"
    args = ["build", str(model_file), "-o", str(engine_file), "--device", "cpu", "--quiet",
            "--shapes", "a:1x3,4x3,8x3 b:1x3,4x3,8x3", "--shapes", "a:32x3 b:32x3"]
    assert main(args) == 0
    engine = kiln.load(engine_file)
    assert engine.profiles == (
        Profile({"a": ((1, 3), (4, 3), (8, 3)), "b": ((1, 3), (4, 3), (8, 3))}),
        Profile({"a": (32, 3), "b": (32, 3)}),
    )
    big = np.ones((32, 3), np.float32)
    assert engine.run({"a": big, "b": big})["z"].shape == (32, 3)
    capsys.readouterr()
    assert main(["inspect", str(engine_file), "--json"]) == 0
    profiles = json.loads(capsys.readouterr().out)["profiles"]
    assert profiles[0]["a"] == {"min": [1, 3], "opt": [4, 3], "max": [8, 3]}
    assert profiles[1]["b"] == {"min": [32, 3], "opt": [32, 3], "max": [32, 3]}
    assert main(["inspect", str(engine_file)]) == 0
    out = capsys.readouterr().out
    assert "optimization profiles" in out and "32x3" in out and "8x3" in out


def test_inspect_without_profiles_lists_none(tmp_path, capsys):
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    assert main(["build", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m.kiln"), "--device", "cpu"]) == 0
    assert main(["inspect", str(tmp_path / "m.kiln"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profiles"] == []
    assert main(["inspect", str(tmp_path / "m.kiln")]) == 0
    assert "optimization profiles" not in capsys.readouterr().out


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True)


def test_bad_shapes_is_a_usage_error(model_file, tmp_path):
    result = _kiln("build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--shapes", "a:1x3,2x3")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "kiln build: error: argument --shapes: expected NAME:MIN,OPT,MAX or NAME:SHAPE with shapes "
        "like 1x16, not 'a:1x3,2x3'"
    )


def test_uncovered_input_is_one_line_and_exit_1(model_file, tmp_path):
    result = _kiln("build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--device", "cpu",
                   "--shapes", "a:1x3,2x3,4x3")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "does not cover input 'b'" in result.stderr
    assert "--shapes 'b:MIN,OPT,MAX'" in result.stderr
