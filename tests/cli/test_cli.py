"""The kiln command: build, run, inspect, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from kiln.cli.main import main
from tests.graphs import mlp, mlp_reference


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


@pytest.fixture
def engine_file(tmp_path, model_file):
    path = tmp_path / "mlp.kiln"
    assert main(["build", str(model_file), "-o", str(path), "--device", "cpu", "--opt-level", "0"]) == 0
    return path


def test_build_writes_an_engine(engine_file):
    assert engine_file.stat().st_size > 0


def test_run_with_given_input_saves_outputs(engine_file, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out_dir = tmp_path / "out"
    assert main(["run", str(engine_file), "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(out_dir)]) == 0
    np.testing.assert_allclose(np.load(out_dir / "y.npy"), mlp_reference(x)[0], rtol=1e-6)
    assert "hidden" in capsys.readouterr().out


def test_run_with_random_inputs_of_given_shape(engine_file, tmp_path):
    assert main(["run", str(engine_file), "--shapes", "x:7x4", "--output-dir", str(tmp_path / "o")]) == 0
    assert np.load(tmp_path / "o" / "y.npy").shape == (7, 4)


def test_inspect_json(engine_file, capsys):
    assert main(["inspect", str(engine_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("inputs", "outputs", "device", "versions", "precision", "layers"):
        assert key in info
    assert info["layers"][0] == {
        "name": "matmul", "op": "MatMul", "sources": ["matmul"], "source_ops": ["MatMul"],
        "precision": "fp32", "choice": "ops", "timed_ms": None, "custom": False,
    }


def test_inspect_json_lists_fused_sources(model_file, tmp_path, capsys):
    engine = tmp_path / "fused.kiln"
    assert main(["build", str(model_file), "-o", str(engine), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(engine), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    fused = [layer for layer in layers if layer["op"] == "kiln::FusedMatMul"]
    assert len(fused) == 1 and fused[0]["sources"] == ["matmul", "bias", "relu"]
    assert fused[0]["source_ops"] == ["MatMul", "Add", "Relu"]


def test_inspect_table(engine_file, capsys):
    assert main(["inspect", str(engine_file)]) == 0
    out = capsys.readouterr().out
    assert "residual" in out and "float32" in out


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True)


def test_not_an_onnx_file_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    result = _kiln("build", str(bad), "-o", str(tmp_path / "e.kiln"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "bad.onnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_engine_is_one_line_and_exit_1(engine_file):
    blob = bytearray(engine_file.read_bytes())
    blob[-1] ^= 1
    engine_file.write_bytes(bytes(blob))
    result = _kiln("run", str(engine_file))
    assert result.returncode == 1
    assert "digest mismatch" in result.stderr and "Traceback" not in result.stderr


def test_wrong_input_is_one_line_and_exit_1(engine_file, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 4)))
    result = _kiln("run", str(engine_file), "--input", f"x={tmp_path / 'x.npy'}")
    assert result.returncode == 1
    assert "float64" in result.stderr and result.stderr.count("\n") == 1


def test_usage_error_exits_2():
    assert _kiln("build").returncode == 2
    assert _kiln("frobnicate").returncode == 2
