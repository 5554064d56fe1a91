"""KServe v2 over HTTP with the real tritonclient: inference equals Engine.run, metadata, the
repository extension, version fallback, build on first load, metrics."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.graphs import mlp
from tests.serve.conftest import MLP_CONFIG, random_x, serving, write_model


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports['http']}")
    yield client
    client.close()


def infer_x(client, x, model="mlp", binary=True, outputs=None, **kwargs):
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return client.infer(model, [tensor], outputs=outputs, **kwargs)


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "kiln"
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


def test_model_metadata_and_config(client):
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")
    metadata = client.get_model_metadata("mlp")
    assert metadata["versions"] == ["1"] and metadata["platform"] == "kiln"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in metadata["outputs"]] == ["y", "hidden"]
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 8 and config["instance_group"][0]["count"] == 2
    # a model without config.pbtxt is served as its engine declares it, without batching
    add_one = client.get_model_metadata("add_one")
    assert add_one["inputs"] == [{"name": "x", "datatype": "INT32", "shape": [-1]}]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_engine_run(client, engines, binary):
    x = random_x(3)
    expected = engines["mlp"].run({"x": x})
    result = infer_x(client, x, binary=binary, outputs=[
        httpclient.InferRequestedOutput("y", binary_data=binary),
        httpclient.InferRequestedOutput("hidden", binary_data=binary),
    ], request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == "mlp" and response["model_version"] == "1" and response["id"] == "r-1"
    for name in ("y", "hidden"):
        np.testing.assert_array_equal(result.as_numpy(name), expected[name])


def test_infer_one_requested_output_and_a_version(client, engines):
    x = random_x(2, seed=1)
    result = infer_x(client, x, model_version="1", outputs=[httpclient.InferRequestedOutput("hidden")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["hidden"]
    np.testing.assert_array_equal(result.as_numpy("hidden"), engines["mlp"].run({"x": x})["hidden"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, engines, algorithm):
    x = random_x(4)
    result = infer_x(
        client, x, request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(result.as_numpy("y"), engines["mlp"].run({"x": x})["y"])


def test_int_bytes_and_two_input_models(client, engines):
    ints = np.array([1, -5, 2**31 - 2], np.int32)
    tensor = httpclient.InferInput("x", [3], "INT32")
    tensor.set_data_from_numpy(ints, binary_data=False)
    np.testing.assert_array_equal(client.infer("add_one", [tensor]).as_numpy("y"), ints + 1)

    words = np.array([b"kiln", b"", "é".encode()], dtype=object)
    for binary in (True, False):
        tensor = httpclient.InferInput("s", [3], "BYTES")
        tensor.set_data_from_numpy(words, binary_data=binary)
        assert list(client.infer("echo", [tensor]).as_numpy("t")) == list(words)

    a, b = random_x(2)[:, :3].copy(), random_x(2, seed=3)[:, :3].copy()
    inputs = [httpclient.InferInput(n, [2, 3], "FP32") for n in "ab"]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    expected = engines["pair"].run({"a": a, "b": b})["z"]
    np.testing.assert_array_equal(client.infer("pair", inputs).as_numpy("z"), expected)


def test_concurrent_requests_are_batched_and_split_back(server, engines):
    url = f"127.0.0.1:{server.ports['http']}"
    before = _metric(server, "nv_inference_exec_count", "mlp")
    inputs = [random_x(1 + i % 3, seed=100 + i) for i in range(24)]
    results: list = [None] * len(inputs)

    def send(index: int) -> None:
        client = httpclient.InferenceServerClient(url)
        results[index] = infer_x(client, inputs[index]).as_numpy("y")
        client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for x, y in zip(inputs, results):
        np.testing.assert_array_equal(y, engines["mlp"].run({"x": x})["y"])
    executions = _metric(server, "nv_inference_exec_count", "mlp") - before
    assert executions < len(inputs)


def test_metrics_use_tritons_names(server, client):
    infer_x(client, random_x(2))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_request_duration_us",
                 "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert f'{name}{{model="mlp",version="1"}} ' in text
    assert "_total" not in text
    assert "nv_gpu_memory_used_bytes{" not in text  # no GPU in use here
    successes = _metric(server, "nv_inference_request_success", "mlp")
    assert _metric(server, "nv_inference_count", "mlp") >= successes > 0


def test_repository_unload_and_load(client):
    names = {entry["name"] for entry in client.get_model_repository_index()}
    assert {"mlp", "pair", "add_one", "echo"} <= names
    client.unload_model("add_one")
    assert not client.is_model_ready("add_one")
    assert client.is_server_ready()  # an unloaded model is not a missing one
    with pytest.raises(InferenceServerException, match="not loaded"):
        tensor = httpclient.InferInput("x", [1], "INT32")
        tensor.set_data_from_numpy(np.array([1], np.int32))
        client.infer("add_one", [tensor])
    client.load_model("add_one")
    assert client.is_model_ready("add_one")


def test_a_failed_version_leaves_the_previous_one_serving(tmp_path, engines):
    write_model(tmp_path, "mlp", engines["mlp"], MLP_CONFIG)
    with serving(tmp_path) as server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports['http']}")
        broken = write_model(tmp_path, "mlp", None, version=2)
        (broken / "model.kiln").write_bytes(b"not an engine")
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("mlp")
        x = random_x(2)
        np.testing.assert_array_equal(infer_x(client, x).as_numpy("y"), engines["mlp"].run({"x": x})["y"])
        index = {entry["version"]: entry for entry in client.get_model_repository_index()}
        assert index["1"]["state"] == "READY"
        assert index["2"]["state"] == "UNAVAILABLE" and "model.kiln" in index["2"]["reason"]

        engines["mlp"].save(broken / "model.kiln")  # fixed: version 2 replaces version 1
        client.load_model("mlp")
        assert client.get_model_metadata("mlp")["versions"] == ["2"]
        assert infer_x(client, x).get_response()["model_version"] == "2"
        client.close()


def test_model_onnx_is_built_on_first_load_and_cached(tmp_path, engines):
    version = tmp_path / "built" / "1"
    version.mkdir(parents=True)
    onnx.save(mlp(), version / "model.onnx")
    (tmp_path / "built" / "config.pbtxt").write_text("max_batch_size: 4 instance_group [ { kind: KIND_CPU } ]")
    with serving(tmp_path) as server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports['http']}")
        x = random_x(3)
        result = infer_x(client, x, model="built")
        np.testing.assert_array_equal(result.as_numpy("y"), engines["mlp"].run({"x": x})["y"])
        client.close()
    assert (version / "model.kiln").is_file()
    assert not list(version.glob("*.tmp"))


def _metric(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}",version="1"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {model} not in {json.dumps(text)[:500]}")
