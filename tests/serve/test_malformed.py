"""A corpus of malformed HTTP requests: each gets a 4xx with ``{"error": ...}``, never a 5xx,
and the server is still live after every one."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.0, 1.5, 2.0]}
NO_DATA = {"name": "x", "shape": [1, 4], "datatype": "FP32"}
INT = {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}
A = {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
INFER = "/v2/models/mlp/infer"
BINARY_X = np.ones((1, 4), np.float32).tobytes()


def with_x(**changes) -> dict:
    return {"inputs": [{**X, **changes}]}


def binary(header: dict, data: bytes, length: str | None = None) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": length if length is not None else str(len(text))}


# name: (method, path, body: dict | bytes | (bytes, headers), expected status or None for any 4xx)
CORPUS = {
    "truncated json": ("POST", INFER, b'{"inputs": [', 400),
    "invalid utf-8": ("POST", INFER, b'{"inputs": "\xff\xfe"}', 400),
    "body not an object": ("POST", INFER, b"[1, 2]", 400),
    "empty body": ("POST", INFER, b"", 400),
    "no inputs": ("POST", INFER, {}, 400),
    "inputs empty": ("POST", INFER, {"inputs": []}, 400),
    "inputs not a list": ("POST", INFER, {"inputs": {"x": 1}}, 400),
    "input not an object": ("POST", INFER, {"inputs": [1]}, 400),
    "input without name": ("POST", INFER, {"inputs": [{k: v for k, v in X.items() if k != "name"}]}, 400),
    "unknown input": ("POST", INFER, with_x(name="X"), 400),
    "input given twice": ("POST", INFER, {"inputs": [X, X]}, 400),
    "missing input": ("POST", "/v2/models/pair/infer", {"inputs": [A]}, 400),
    "shape not a list": ("POST", INFER, with_x(shape="1x4"), 400),
    "negative dimension": ("POST", INFER, with_x(shape=[-1, 4]), 400),
    "float dimension": ("POST", INFER, with_x(shape=[1.0, 4]), 400),
    "bool dimension": ("POST", INFER, with_x(shape=[True, 4]), 400),
    "dimension overflows int64": ("POST", INFER, with_x(shape=[2**64, 4]), 400),
    "huge shape, little data": ("POST", INFER, with_x(shape=[2**40, 2**20]), 400),
    "unknown datatype": ("POST", INFER, with_x(datatype="FP128"), 400),
    "datatype not the model's": ("POST", INFER, with_x(datatype="FP64"), 400),
    "wrong rank": ("POST", INFER, with_x(shape=[4]), 400),
    "wrong dimension": ("POST", INFER, with_x(shape=[1, 5], data=[0] * 5), 400),
    "batch over max_batch_size": ("POST", INFER, with_x(shape=[9, 4], data=[0] * 36), 400),
    "batch of zero": ("POST", INFER, with_x(shape=[0, 4], data=[]), 400),
    "batch sizes differ": ("POST", "/v2/models/pair/infer", {"inputs": [
        {**A, "shape": [2, 3], "data": [0] * 6}, {**A, "name": "b", "shape": [3, 3], "data": [0] * 9}]}, 400),
    "data count": ("POST", INFER, with_x(data=[1, 2, 3]), 400),
    "ragged data": ("POST", INFER, with_x(data=[[1, 2], [3]]), 400),
    "strings as FP32": ("POST", INFER, with_x(data=["a", "b", "c", "d"]), 400),
    "null in data": ("POST", INFER, with_x(data=[1, None, 3, 4]), 400),
    "data not a list": ("POST", INFER, with_x(data="1,2,3,4"), 400),
    "int out of range": ("POST", "/v2/models/add_one/infer", {"inputs": [{**INT, "data": [1, 2**31]}]}, 400),
    "float for INT32": ("POST", "/v2/models/add_one/infer", {"inputs": [{**INT, "data": [1, 2.5]}]}, 400),
    "bool for INT32": ("POST", "/v2/models/add_one/infer", {"inputs": [{**INT, "data": [True, False]}]}, 400),
    "numbers for BYTES": ("POST", "/v2/models/echo/infer", {"inputs": [
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": [5]}]}, 400),
    "neither data nor binary": ("POST", INFER, {"inputs": [NO_DATA]}, 400),
    "data and binary": ("POST", INFER, binary(with_x(parameters={"binary_data_size": 16}), BINARY_X), 400),
    "binary size not an int": ("POST", INFER, binary(
        {"inputs": [{**X, "data": None, "parameters": {"binary_data_size": "16"}}]}, BINARY_X), 400),
    "binary beyond the body": ("POST", INFER, binary(
        {"inputs": [{**NO_DATA, "parameters": {"binary_data_size": 64}}]},
        BINARY_X), 400),
    "binary byte size": ("POST", INFER, binary(
        {"inputs": [{**NO_DATA, "parameters": {"binary_data_size": 12}}]},
        BINARY_X), 400),
    "binary left over": ("POST", INFER, binary(
        {"inputs": [{**NO_DATA, "parameters": {"binary_data_size": 16}}]},
        BINARY_X + b"more"), 400),
    "BYTES element overruns": ("POST", "/v2/models/echo/infer", binary(
        {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
        b"\x09\x00\x00\x00ab"), 400),
    "header length not a number": ("POST", INFER, binary(with_x(), b"", length="ten"), 400),
    "header length beyond body": ("POST", INFER, binary(with_x(), b"", length="100000"), 400),
    "header length negative": ("POST", INFER, binary(with_x(), b"", length="-5"), 400),
    "unknown output": ("POST", INFER, {**with_x(), "outputs": [{"name": "z"}]}, 400),
    "output without name": ("POST", INFER, {**with_x(), "outputs": [{}]}, 400),
    "classification asked": ("POST", INFER, {**with_x(), "outputs": [
        {"name": "y", "parameters": {"classification": 3}}]}, 400),
    "parameters not an object": ("POST", INFER, {**with_x(), "parameters": [1]}, 400),
    "negative timeout": ("POST", INFER, {**with_x(), "parameters": {"timeout": -1}}, 400),
    "binary_data_output not a bool": (
        "POST", INFER, {**with_x(), "parameters": {"binary_data_output": "yes"}}, 400),
    "id not a string": ("POST", INFER, {**with_x(), "id": 7}, 400),
    "unknown model": ("POST", "/v2/models/nope/infer", with_x(), 404),
    "unknown version": ("POST", "/v2/models/mlp/versions/9/infer", with_x(), 404),
    "version not a number": ("POST", "/v2/models/mlp/versions/latest/infer", with_x(), 400),
    "metadata of unknown model": ("GET", "/v2/models/nope", None, 404),
    "traversal in infer path": ("POST", "/v2/models/..%2F..%2Fetc/infer", with_x(), None),
    "traversal in load": ("POST", "/v2/repository/models/..%2F..%2Ftmp/load", b"", None),
    "dot-dot model load": ("POST", "/v2/repository/models/../load", b"", None),
    "hidden model load": ("POST", "/v2/repository/models/.cache/load", b"", 400),
    "unknown model load": ("POST", "/v2/repository/models/nope/load", b"", 404),
    "unload of unknown model": ("POST", "/v2/repository/models/nope/unload", b"", 404),
    "load with parameters": ("POST", "/v2/repository/models/mlp/load", {"parameters": {"config": "{}"}}, 400),
    "index ready not a bool": ("POST", "/v2/repository/index", {"ready": "yes"}, 400),
    "GET on infer": ("GET", INFER, None, 405),
    "unknown route": ("GET", "/v3/health", None, 404),
    "body over the size limit": ("POST", INFER, b"{" + b" " * (1 << 20) + b"}", 413),
    "unregistered shared memory region": ("POST", INFER, {"inputs": [{**NO_DATA, "parameters": {
        "shared_memory_region": "nope", "shared_memory_byte_size": 16}}]}, 400),
    "shared memory without byte size": ("POST", INFER, {"inputs": [{**NO_DATA, "parameters": {
        "shared_memory_region": "nope"}}]}, 400),
    "shared memory offset alone": ("POST", INFER, {"inputs": [{**NO_DATA, "parameters": {
        "shared_memory_offset": 0}}]}, 400),
    "output into unregistered region": ("POST", INFER, {**with_x(), "outputs": [{"name": "y", "parameters": {
        "shared_memory_region": "nope", "shared_memory_byte_size": 16}}]}, 400),
    "register a missing object": (
        "POST", "/v2/systemsharedmemory/region/r/register", {"key": "/kiln-none", "byte_size": 8}, 400),
    "register a key with a path": (
        "POST", "/v2/systemsharedmemory/region/r/register", {"key": "/../../etc/passwd", "byte_size": 8}, 400),
    "register without key": ("POST", "/v2/systemsharedmemory/region/r/register", {"byte_size": 8}, 400),
    "status of unknown region": ("GET", "/v2/systemsharedmemory/region/nope/status", None, 404),
}


@pytest.fixture(scope="module")
def connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=10)
    yield connection
    connection.close()


def request(connection, method: str, path: str, body=None) -> tuple[int, bytes]:
    headers = {}
    if isinstance(body, tuple):
        body, headers = body
    elif isinstance(body, dict):
        body = json.dumps(body).encode()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=list(CORPUS))
def test_malformed_request_gets_a_client_error(connection, case):
    method, path, body, expected = CORPUS[case]
    status, payload = request(connection, method, path, body)
    if status == 413:  # the server closes a connection whose body it refused to read
        connection.close()
    assert 400 <= status < 500, payload
    if expected is not None:
        assert status == expected, payload
    assert isinstance(json.loads(payload)["error"], str)
    assert request(connection, "GET", "/v2/health/live")[0] == 200


def test_a_good_request_still_succeeds_after_the_corpus(connection):
    status, payload = request(connection, "POST", INFER, with_x())
    assert status == 200, payload
    assert json.loads(payload)["outputs"][0]["shape"] == [1, 4]
