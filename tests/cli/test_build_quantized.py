"""``kiln build --precision int8 --calibration-data DIR --report``: calibrate from files, report
the accuracy against FP32; bad calibration input is a one-line error."""

from __future__ import annotations

import numpy as np
import onnx

from kiln.cli.main import main
from tests.graphs import mlp


def _calibration_dir(tmp_path, batches=3):
    folder = tmp_path / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(batches):
        np.savez(folder / f"batch{i}.npz", x=rng.standard_normal((16, 4)).astype(np.float32))
    return folder


def test_int8_build_reports_its_accuracy(tmp_path, capsys):
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    folder = _calibration_dir(tmp_path)
    cache = tmp_path / "ranges.json"
    code = main([
        "build", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m.kiln"), "--device", "cpu",
        "--precision", "int8", "--calibration-data", str(folder), "--calibration-method", "minmax",
        "--calibration-cache", str(cache), "--report", "-q",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy against FP32" in out
    assert "QuantizeLayers" in out
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("y "))
    cosine = float(row.split("│")[5])
    assert 0.99 < cosine < 1.0  # quantized, and close
    assert cache.is_file()
    # the cache alone calibrates the next build
    assert main([
        "build", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m2.kiln"), "--device", "cpu",
        "--precision", "int8", "--calibration-method", "minmax", "--calibration-cache", str(cache),
        "-q",
    ]) == 0


def test_bad_calibration_directory_is_one_line(tmp_path, capsys):
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    folder = tmp_path / "calibration"
    folder.mkdir()
    np.savez(folder / "b.npz", x=np.ones((2, 5), np.float32))  # 5 features, the model takes 4
    code = main([
        "build", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m.kiln"), "--device", "cpu",
        "--precision", "int8", "--calibration-data", str(folder), "-q",
    ])
    assert code != 0
    err = capsys.readouterr().err
    assert "b.npz" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.kiln").exists()
