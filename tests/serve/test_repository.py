"""The model repository: config.pbtxt parsing, version policies, safe model names, instance
devices, and configs checked against their engines."""

from __future__ import annotations

import os

import pytest
from tritonclient.grpc import model_config_pb2

from kiln.serve.metrics import ModelMetrics
from kiln.serve.model import ModelVersion
from kiln.serve.protocol import InvalidRequest, NotFound
from kiln.serve.repository import (
    ModelLoadError, ModelRepository, RepositoryError, instance_devices, select_versions,
)
from tests.serve.conftest import MLP_CONFIG, write_model


def config(text: str) -> model_config_pb2.ModelConfig:
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_reads_tritons_config_format(tmp_path, engines):
    write_model(tmp_path, "mlp", engines["mlp"], MLP_CONFIG)
    repository = ModelRepository(tmp_path)
    parsed = repository.read_config("mlp")
    assert parsed.max_batch_size == 8 and parsed.input[0].dims == [4]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 20000
    assert repository.model_names() == ["mlp"] and repository.versions_on_disk("mlp") == [1]


@pytest.mark.parametrize("text, message", [
    ("max_batch_size: 'eight'", "config.pbtxt"),
    ('name: "other"', "differs from the directory"),
    ("sequence_batching { }", "does not support sequence_batching"),
    ("max_batch_size: -1", "max_batch_size"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]', "reshape"),
    ("instance_group [ { gpus: [ 1 ] } ]", "gpus"),
])
def test_rejects_configs_it_cannot_honour(tmp_path, text, message):
    write_model(tmp_path, "m", None, text)
    with pytest.raises(ModelLoadError, match=message):
        ModelRepository(tmp_path).read_config("m")


def test_version_policies():
    on_disk = [1, 2, 5]
    assert select_versions(config(""), on_disk) == [5]
    assert select_versions(config("version_policy { latest { num_versions: 2 } }"), on_disk) == [2, 5]
    assert select_versions(config("version_policy { all { } }"), on_disk) == [1, 2, 5]
    assert select_versions(config("version_policy { specific { versions: [ 2, 7 ] } }"), on_disk) == [2, 7]


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".hidden", "", "a\0b", "x/../.."])
def test_model_names_cannot_leave_the_repository(tmp_path, name):
    with pytest.raises(InvalidRequest):
        ModelRepository(tmp_path).model_dir(name)


def test_a_symlink_out_of_the_repository_is_no_model(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "repo" / "escape")
    with pytest.raises(NotFound):
        ModelRepository(tmp_path / "repo").model_dir("escape")


def test_a_missing_repository_is_an_error(tmp_path):
    with pytest.raises(RepositoryError, match="not a directory"):
        ModelRepository(tmp_path / "nope")


def test_instance_devices():
    assert instance_devices(config("")) == [None]
    assert instance_devices(config(
        "instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_GPU } ]"
    )) == ["cpu", "cpu", "cuda"]


@pytest.mark.parametrize("text, message", [
    ('max_batch_size: 4 input [ { name: "x" data_type: TYPE_INT64 dims: [ 4 ] } ]', "is FP32 in the engine"),
    ('max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]', "has dims"),
    ('max_batch_size: 4 input [ { name: "q" data_type: TYPE_FP32 dims: [ 4 ] } ]', "declares input 'q'"),
    ('max_batch_size: 4 output [ { name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]', "declares output 'z'"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', "has dims"),  # batch dimension missing
])
def test_configs_must_match_their_engine(engines, text, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelVersion("mlp", 1, config(text), [engines["mlp"]], ModelMetrics())


def test_a_config_can_serve_a_subset_of_outputs(engines):
    version = ModelVersion(
        "mlp", 1, config('max_batch_size: 2 output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]'),
        [engines["mlp"]], ModelMetrics(),
    )
    try:
        assert list(version.outputs) == ["y"] and version.outputs["y"].dims == (4,)
    finally:
        version.batcher.close()
