"""kiln bench: trtexec-style report fields, streams, peers side by side, usage errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from kiln.cli import bench
from kiln.cli.main import main
from tests.graphs import mlp

TORCH_MLP = '''
import torch
from onnx import numpy_helper
from tests.graphs import mlp


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w, b = (torch.from_numpy(numpy_helper.to_array(t).copy()) for t in mlp().graph.initializer)
        self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)

    def forward(self, x):
        hidden = torch.relu(x @ self.w + self.b)
        return hidden + x, hidden


def make():
    return MLP()
'''
SUMMARY_KEYS = {"min", "mean", "median", "p90", "p95", "p99"}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


@pytest.fixture
def torch_module_file(tmp_path):
    path = tmp_path / "mlp_module.py"
    path.write_text(TORCH_MLP)
    return path


def _bench_json(capsys, *args: str) -> dict:
    assert main(["bench", *args, "--json", "--warmup", "2"]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_is_built_then_timed_with_every_field(model_file, capsys):
    report = _bench_json(capsys, str(model_file), "--device", "cpu", "--iterations", "20", "--shapes", "x:8x4")
    assert report["device"] == "cpu" and report["inputs"] == {"x": [8, 4]}
    assert report["iterations"] == 20 and report["streams"] == 1
    assert report["throughput_qps"] > 0
    for key in ("latency_ms", "enqueue_ms", "host_to_device_ms", "compute_ms", "device_to_host_ms"):
        assert SUMMARY_KEYS <= set(report[key]), key
        assert 0 <= report[key]["min"] <= report[key]["median"] <= report[key]["p99"]
    # The phases make up the latency of each run.
    parts = sum(report[k]["mean"] for k in ("host_to_device_ms", "compute_ms", "device_to_host_ms"))
    assert parts == pytest.approx(report["latency_ms"]["mean"], rel=1e-3)
    assert report["peak_gpu_memory_bytes"] is None  # cpu
    assert report["cuda_graphs"]["used"] is False and report["cuda_graphs"]["requested"] is True
    assert isinstance(report["warnings"], list) and report["stable"] == (not report["warnings"])
    assert report["vs"] == {}


def test_engine_on_several_streams(model_file, tmp_path, capsys):
    engine = tmp_path / "mlp.kiln"
    assert main(["build", str(model_file), "-o", str(engine), "--device", "cpu", "-q"]) == 0
    report = _bench_json(capsys, str(engine), "--streams", "3", "--iterations", "5", "--no-cuda-graph")
    assert report["streams"] == 3 and report["iterations"] == 15
    assert report["cuda_graphs"]["requested"] is False


def test_side_by_side_with_onnxruntime_and_torch(model_file, torch_module_file, capsys):
    report = _bench_json(
        capsys, str(model_file), "--device", "cpu", "--iterations", "10",
        "--vs", "onnxruntime,torch", "--torch-module", f"{torch_module_file}:make",
    )
    assert set(report["vs"]) == {"onnxruntime", "torch"}
    assert report["vs"]["onnxruntime"]["provider"] == "CPUExecutionProvider"
    for peer in report["vs"].values():
        assert peer["iterations"] == 10 and SUMMARY_KEYS <= set(peer["latency_ms"])
        assert peer["kiln_speedup"] == pytest.approx(
            report["throughput_qps"] / peer["throughput_qps"], rel=1e-3
        )


def test_human_report_names_phases_and_peers(model_file, capsys):
    assert main(["bench", str(model_file), "--device", "cpu", "--iterations", "5", "--vs", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    for word in ("latency", "enqueue", "host to device", "compute", "device to host", "onnxruntime"):
        assert word in out


def test_unstable_timings_are_flagged():
    steady = {"latency_ms": {"cv": 0.01}, "vs": {"onnxruntime": {"latency_ms": {"cv": 0.2}}}}
    [warning] = bench._warnings(steady)
    assert warning.startswith("onnxruntime: unstable timings") and "20.0%" in warning


@pytest.mark.parametrize(
    "args",
    [
        ["--vs", "torch"],  # no --torch-module
        ["--vs", "tensorrt"],  # unknown peer
        ["--streams", "0"],
    ],
)
def test_usage_errors_exit_2(model_file, args):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(model_file), "--device", "cpu", *args])
    assert exit_info.value.code == 2


def test_onnxruntime_needs_the_model_not_an_engine(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tmp_path / "some.kiln"), "--vs", "onnxruntime"])
    assert exit_info.value.code == 2


def _engine(model_file, tmp_path, precision: str, device: str) -> str:
    engine = tmp_path / f"mlp-{precision}.kiln"
    assert main(["build", str(model_file), "-o", str(engine), "--device", device,
                 "--precision", precision, "-q"]) == 0
    return str(engine)


def test_torch_peers_compute_in_the_engines_float_type(model_file, torch_module_file, tmp_path,
                                                       capsys, monkeypatch):
    made, real = [], bench.TorchRunner

    def recording(*args, **kwargs):
        made.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "TorchRunner", recording)
    report = _bench_json(
        capsys, _engine(model_file, tmp_path, "bf16", "cpu"), "--iterations", "3",
        "--vs", "torch", "--torch-module", f"{torch_module_file}:make",
    )
    assert made == [torch.bfloat16] and report["vs"]["torch"]["iterations"] == 3
    assert report["data_transfers"] is True  # a CPU run has none to leave out, but says so


def test_torch_runner_keeps_device_tensors_where_they_are(torch_module_file):
    from kiln.cli.runners import TorchRunner, load_torch_module

    runner = TorchRunner(load_torch_module(f"{torch_module_file}:make"), "cpu", ["x"], ["y", "h"],
                         dtype=torch.bfloat16)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    as_arrays = runner.infer({"x": x})
    as_tensors = runner.infer({"x": torch.from_numpy(x)})
    assert isinstance(as_arrays["y"], np.ndarray) and as_arrays["y"].dtype == np.float32
    assert isinstance(as_tensors["y"], torch.Tensor) and as_tensors["y"].dtype == torch.bfloat16
    np.testing.assert_allclose(as_arrays["y"], as_tensors["y"].float().numpy())


@pytest.mark.gpu
def test_no_data_transfers_times_the_gpu_alone(model_file, torch_module_file, tmp_path, capsys):
    report = _bench_json(
        capsys, _engine(model_file, tmp_path, "fp16", "cuda"), "--iterations", "10",
        "--no-data-transfers", "--vs", "torch", "--torch-module", f"{torch_module_file}:make",
    )
    assert report["data_transfers"] is False
    for copies in ("host_to_device_ms", "device_to_host_ms"):  # nothing to copy: marks only
        assert report[copies]["median"] < 0.05
    assert set(report["vs"]) == {"torch"}


def test_a_torch_module_file_may_define_dataclasses(tmp_path):
    from kiln.cli.runners import load_torch_module

    path = tmp_path / "with_dataclass.py"
    path.write_text(
        "import dataclasses, torch\n\n@dataclasses.dataclass\nclass Settings:\n    width: int = 4\n\n"
        "def make():\n    return torch.nn.Linear(Settings().width, 2)\n"
    )
    assert isinstance(load_torch_module(f"{path}:make"), torch.nn.Linear)
