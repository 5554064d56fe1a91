"""Triton's system shared memory extension over gRPC and HTTP with the real tritonclient: inputs
read from and outputs written to registered regions equal Engine.run, concurrent requests reading
one region batch correctly, and every misuse is a client error."""

from __future__ import annotations

import concurrent.futures
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import random_x

ROWS = 8  # the region holds 8 inputs of [1, 4] float32, one after another
ROW_BYTES = 16


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    module = module_of(request.param)
    url = f"127.0.0.1:{server.ports[request.param]}"
    client = module.InferenceServerClient(url)
    client.protocol, client.url = request.param, url
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions():
    """An input object and an output object in /dev/shm, removed after the test."""
    tag = uuid.uuid4().hex[:8]
    made = {
        "input": shm.create_shared_memory_region(f"in-{tag}", f"/kiln-in-{tag}", ROWS * ROW_BYTES),
        "output": shm.create_shared_memory_region(f"out-{tag}", f"/kiln-out-{tag}", ROWS * ROW_BYTES),
    }
    yield made
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def module_of(client_or_protocol):
    protocol = getattr(client_or_protocol, "protocol", client_or_protocol)
    if protocol == "grpc":
        return grpcclient
    try:
        import tritonclient.http as httpclient
    except (ImportError, RuntimeError):  # it raises RuntimeError without gevent
        pytest.skip("tritonclient.http needs gevent")
    return httpclient


def register(client, handle, byte_size=ROWS * ROW_BYTES, offset=0):
    client.register_system_shared_memory(handle._triton_shm_name, handle._shm_key, byte_size, offset)


def region_names(client) -> set[str]:
    status = client.get_system_shared_memory_status()
    if client.protocol == "grpc":
        return set(status.regions)
    return {region["name"] for region in status}


def test_inputs_and_outputs_in_shared_memory_equal_engine_run(client, regions, engines):
    x = random_x(ROWS, seed=3)
    shm.set_shared_memory_region(regions["input"], [x])
    register(client, regions["input"])
    register(client, regions["output"])
    assert region_names(client) == {h._triton_shm_name for h in regions.values()}
    expected = engines["mlp"].run({"x": x[2:3]})
    module = module_of(client)
    tensor = module.InferInput("x", [1, 4], "FP32")
    tensor.set_shared_memory(regions["input"]._triton_shm_name, ROW_BYTES, offset=2 * ROW_BYTES)
    y = module.InferRequestedOutput("y")
    y.set_shared_memory(regions["output"]._triton_shm_name, ROW_BYTES, offset=ROW_BYTES)
    hidden = module.InferRequestedOutput("hidden")  # this one comes back in the response
    result = client.infer("mlp", [tensor], outputs=[y, hidden])

    np.testing.assert_array_equal(result.as_numpy("hidden"), expected["hidden"])
    written = result.get_output("y")
    parameters = written.parameters if client.protocol == "grpc" else written["parameters"]
    size = parameters["shared_memory_byte_size"]
    assert (size.int64_param if client.protocol == "grpc" else size) == ROW_BYTES
    in_region = shm.get_contents_as_numpy(regions["output"], np.float32, [2, 4])
    np.testing.assert_array_equal(in_region[1:], expected["y"])

    client.unregister_system_shared_memory(regions["output"]._triton_shm_name)
    assert region_names(client) == {regions["input"]._triton_shm_name}


def test_concurrent_requests_from_one_region_batch_and_split_back(client, regions, engines):
    x = random_x(ROWS, seed=4)
    shm.set_shared_memory_region(regions["input"], [x])
    register(client, regions["input"])
    module = module_of(client)

    def infer(row: int) -> np.ndarray:
        tensor = module.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory(regions["input"]._triton_shm_name, ROW_BYTES, offset=row * ROW_BYTES)
        own = module.InferenceServerClient(client.url)  # the HTTP client is not thread-safe
        try:
            return own.infer("mlp", [tensor], outputs=[module.InferRequestedOutput("y")]).as_numpy("y")
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(ROWS) as pool:
        results = list(pool.map(infer, range(ROWS)))
    np.testing.assert_allclose(np.concatenate(results), engines["mlp"].run({"x": x})["y"], rtol=1e-6, atol=1e-7)


def test_misuse_is_a_client_error_and_the_server_stays_live(client, regions):
    register(client, regions["input"], byte_size=4 * ROW_BYTES, offset=ROW_BYTES)
    name = regions["input"]._triton_shm_name
    module = module_of(client)

    def infer_from(byte_size: int, offset: int, output_bytes: int | None = None) -> str:
        tensor = module.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory(name, byte_size, offset=offset)
        outputs = None
        if output_bytes is not None:
            register(client, regions["output"], byte_size=output_bytes)
            y = module.InferRequestedOutput("y")
            y.set_shared_memory(regions["output"]._triton_shm_name, output_bytes)
            outputs = [y]
        with pytest.raises(InferenceServerException) as raised:
            client.infer("mlp", [tensor], outputs=outputs)
        assert client.is_server_live()
        return str(raised.value)

    assert "exceeds the 64 bytes" in infer_from(ROW_BYTES, 4 * ROW_BYTES)  # past the region's end
    assert "takes 16" in infer_from(12, 0)  # not the tensor's byte size
    assert "more than the 8 bytes" in infer_from(ROW_BYTES, 0, output_bytes=8)  # output too large
    with pytest.raises(InferenceServerException, match="registered already"):
        register(client, regions["input"])
    with pytest.raises(InferenceServerException, match="exceeds the 128 bytes"):
        client.register_system_shared_memory("big", regions["input"]._shm_key, 1024)
    with pytest.raises(InferenceServerException, match="no shared memory object"):
        client.register_system_shared_memory("gone", "/kiln-no-such-object", 16)
    with pytest.raises(InferenceServerException, match="not a valid name"):
        client.register_system_shared_memory("up", "/../tmp/x", 16)
    client.unregister_system_shared_memory("never-registered")  # no error, as in Triton
    assert client.is_server_live()
