"""Shared set-up of the serving tests: small CPU engines, repositories written from them, and
servers on free local ports that every test stops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.serve import BackgroundServer, ServerOptions
from tests.graphs import mlp, two_inputs

MLP_CONFIG = """
name: "mlp"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "y" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "hidden" data_type: TYPE_FP32 dims: [ 4 ] }
]
dynamic_batching { max_queue_delay_microseconds: 20000 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""
PAIR_CONFIG = 'max_batch_size: 4\ninstance_group [ { kind: KIND_CPU } ]\n'


def add_one_int32() -> onnx.ModelProto:
    """y = x + 1 over int32[n]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["n"])],
        [helper.make_tensor("one", TensorProto.INT32, [], [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def echo_strings() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "echo",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="session")
def engines() -> dict[str, kiln.Engine]:
    return {
        "mlp": kiln.build(mlp(), device="cpu"),
        "pair": kiln.build(two_inputs(), device="cpu"),
        "add_one": kiln.build(add_one_int32(), device="cpu"),
        "echo": kiln.build(echo_strings(), device="cpu"),
    }


def write_model(
    repository: Path, name: str, engine: kiln.Engine | None, config: str | None = None,
    version: int = 1,
) -> Path:
    """REPO/name/config.pbtxt and REPO/name/version/model.kiln; returns the version directory."""
    directory = repository / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        engine.save(directory / "model.kiln")
    if config is not None:
        (repository / name / "config.pbtxt").write_text(config)
    return directory


def standard_repository(root: Path, engines: dict[str, kiln.Engine]) -> Path:
    write_model(root, "mlp", engines["mlp"], MLP_CONFIG)
    write_model(root, "pair", engines["pair"], PAIR_CONFIG)
    write_model(root, "add_one", engines["add_one"])  # no config: served as the engine says
    write_model(root, "echo", engines["echo"])
    return root


@contextlib.contextmanager
def serving(repository: Path, **options: object) -> Iterator[BackgroundServer]:
    """A server on free ports of 127.0.0.1, stopped when the block ends."""
    options = ServerOptions(http_port=0, grpc_port=0, metrics_port=0, **options)
    with BackgroundServer(repository, options) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, engines) -> Iterator[BackgroundServer]:
    repository = standard_repository(tmp_path_factory.mktemp("repo"), engines)
    with serving(repository, max_request_bytes=1 << 20) as running:
        yield running


def random_x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)
