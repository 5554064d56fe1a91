"""KServe v2 over gRPC with the real tritonclient: inference equals Engine.run, metadata,
readiness, the repository extension, typed contents, and status codes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import random_x


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "kiln"
    metadata = client.get_model_metadata("mlp")
    assert metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]
    assert client.get_model_config("mlp").config.max_batch_size == 8


def test_infer_equals_engine_run(client, engines):
    x = random_x(5)
    tensor = grpcclient.InferInput("x", [5, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor], request_id="g-1")
    expected = engines["mlp"].run({"x": x})
    assert result.get_response().id == "g-1"
    for name in ("y", "hidden"):
        np.testing.assert_array_equal(result.as_numpy(name), expected[name])
    only = client.infer("mlp", [tensor], outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in only.get_response().outputs] == ["y"]


def test_bytes_and_typed_contents(client, stub, engines):
    words = np.array([b"a", b"bc"], dtype=object)
    tensor = grpcclient.InferInput("s", [2], "BYTES")
    tensor.set_data_from_numpy(words)
    assert list(client.infer("echo", [tensor]).as_numpy("t")) == list(words)

    request = pb.ModelInferRequest(model_name="add_one")
    request.inputs.add(name="x", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2, 3])
    response = stub.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], np.int32).tolist() == [2, 3, 4]


def test_repository_index_load_unload(client):
    assert {m.name for m in client.get_model_repository_index().models} >= {"mlp", "pair"}
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")


def _request(model="mlp", shape=(1, 4), datatype="FP32", raw=None, **fields):
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="x", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw if raw is not None else random_x(shape[0]).tobytes())
    return request


MALFORMED = {
    "unknown model": (_request(model="nope"), grpc.StatusCode.NOT_FOUND),
    "unknown version": (_request(model_version="9"), grpc.StatusCode.NOT_FOUND),
    "path traversal model": (_request(model="../mlp"), grpc.StatusCode.NOT_FOUND),
    "wrong shape": (_request(shape=(1, 5), raw=b"\0" * 20), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong datatype": (_request(datatype="INT32", raw=b"\0" * 16), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown datatype": (_request(datatype="FP8"), grpc.StatusCode.INVALID_ARGUMENT),
    "byte size": (_request(raw=b"\0" * 15), grpc.StatusCode.INVALID_ARGUMENT),
    "batch too large": (_request(shape=(9, 4), raw=b"\0" * 144), grpc.StatusCode.INVALID_ARGUMENT),
    "negative dim": (_request(shape=(-1, 4), raw=b""), grpc.StatusCode.INVALID_ARGUMENT),
    "overflowing dims": (_request(shape=(2**62, 2**62), raw=b""), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown output": (
        _request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "no inputs": (pb.ModelInferRequest(model_name="mlp"), grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_requests_get_client_error_codes(stub, client, case):
    request, code = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == code, raised.value.details()
    assert client.is_server_live()


def test_raw_contents_count_and_typed_fp16(stub):
    request = _request()
    request.raw_input_contents.append(b"extra")
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = pb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="x", datatype="FP16", shape=[1, 4])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(typed)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_the_size_limit_is_refused(client):
    big = np.zeros((8, 4), np.float32)
    tensor = grpcclient.InferInput("x", [8, 4], "FP32")
    tensor.set_data_from_numpy(big)
    oversized = grpcclient.InferInput("padding", [300_000], "FP32")  # 1.2 MB over a 1 MiB limit
    oversized.set_data_from_numpy(np.zeros(300_000, np.float32))
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
        client.infer("mlp", [tensor, oversized])
    assert client.is_server_live()
