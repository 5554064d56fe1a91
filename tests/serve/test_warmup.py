"""model_warmup: samples built from the config (zeros, random values, files in warmup/), run on
every instance before the version serves, and on a GPU captured as CUDA graphs; a sample the
model cannot take fails the load with a message naming it."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import kiln
from kiln.serve.batcher import Instance
from kiln.serve.metrics import ModelMetrics
from kiln.serve.model import ModelVersion
from kiln.serve.repository import ModelLoadError, ModelRepository
from kiln.serve.warmup import warmup_samples
from tests.graphs import mlp
from tests.serve.conftest import write_model

BATCHING = "max_batch_size: 8\ninstance_group [ { count: 2 kind: %s } ]\n"


def warmup(name: str, batch: int, data: str, dims: str = "4", count: int = 0) -> str:
    return (f'model_warmup [ {{ name: "{name}" batch_size: {batch} count: {count} inputs {{ key: "x" '
            f'value: {{ data_type: TYPE_FP32 dims: [ {dims} ] {data} }} }} }} ]\n')


def config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_samples_from_zeros_random_values_and_files(tmp_path):
    (tmp_path / "warmup").mkdir()
    row = np.arange(8, dtype=np.float32).reshape(2, 4)
    (tmp_path / "warmup" / "two_rows").write_bytes(row.tobytes())
    text = BATCHING % "KIND_CPU" + warmup("zeros", 3, "zero_data: true") + warmup(
        "random", 1, "random_data: true", count=3) + warmup("file", 2, 'input_data_file: "two_rows"')
    zeros, random, file = warmup_samples(config(text), tmp_path)
    assert zeros.inputs["x"].shape == (3, 4) and not zeros.inputs["x"].any() and zeros.count == 1
    assert random.inputs["x"].dtype == np.float32 and random.inputs["x"].std() > 0 and random.count == 3
    np.testing.assert_array_equal(file.inputs["x"], row)


@pytest.mark.parametrize("entry, message", [
    (warmup("big", 9, "zero_data: true"), "batch_size must be from 1 to max_batch_size"),
    (warmup("none", 1, ""), "set zero_data, random_data or input_data_file"),
    (warmup("gone", 1, 'input_data_file: "missing"'), "no file 'missing'"),
    (warmup("escape", 1, 'input_data_file: "../config.pbtxt"'), "no file '../config.pbtxt'"),
    (warmup("short", 2, 'input_data_file: "one_row"'), "holds 16 bytes; shape \\[2, 4\\] takes 32"),
    (warmup("neg", 1, "zero_data: true", dims="-1"), "dims must be sizes"),
])
def test_samples_that_cannot_be_built_fail_the_load(tmp_path, entry, message):
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "one_row").write_bytes(np.zeros(4, np.float32).tobytes())
    (tmp_path / "config.pbtxt").write_text("")
    with pytest.raises(ModelLoadError, match=message):
        warmup_samples(config(BATCHING % "KIND_CPU" + entry), tmp_path)


@pytest.mark.parametrize("dims, message", [("5", "has shape \\[1, 5\\]"), ("2, 2", "has shape \\[1, 2, 2\\]")])
def test_samples_the_model_cannot_take_fail_the_load(engines, dims, message):
    text = BATCHING % "KIND_CPU" + warmup("odd", 1, "zero_data: true", dims=dims)
    with pytest.raises(ModelLoadError, match=f"model_warmup 'odd': .*{message}"):
        ModelVersion("mlp", 1, config(text), [engines["mlp"]], ModelMetrics(),
                     warmup_samples(config(text), None))


def test_every_instance_runs_every_sample_before_serving(tmp_path, engines):
    write_model(tmp_path, "mlp", engines["mlp"], BATCHING % "KIND_CPU" + warmup(
        "a", 2, "random_data: true", count=3) + warmup("b", 5, "zero_data: true"))
    repository = ModelRepository(tmp_path)
    runs = []
    original = Instance.run
    with mock.patch.object(Instance, "run", lambda self, inputs: runs.append(
            (id(self), inputs["x"].shape)) or original(self, inputs)):
        version = ModelVersion.load(repository, "mlp", 1, repository.read_config("mlp"), ModelMetrics())
    try:
        assert len({instance for instance, _ in runs}) == 2
        assert sorted(shape for _, shape in runs) == [(2, 4)] * 6 + [(5, 4)] * 2
        assert version.metrics.snapshot()["nv_inference_exec_count"] == 0  # warm-up is not inference
    finally:
        version.batcher.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_every_warmed_up_batch_size_replays_a_graph(tmp_path):
    entries = "".join(warmup(f"b{b}", b, "random_data: true") for b in range(1, 9))
    write_model(tmp_path, "mlp", kiln.build(mlp(), device="cuda"), BATCHING % "KIND_GPU" + entries)
    repository = ModelRepository(tmp_path)
    version = ModelVersion.load(repository, "mlp", 1, repository.read_config("mlp"), ModelMetrics())
    try:
        for instance in version.batcher.instances:
            assert instance.captured_signatures == 8
    finally:
        version.batcher.close()
