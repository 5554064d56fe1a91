"""KServe v2 over HTTP/REST (aiohttp), with Triton's binary tensor data, model repository and
system shared memory extensions, and the Prometheus endpoint on a port of its own.

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes
followed by the raw tensors, each input saying its size in ``parameters.binary_data_size``; an
output goes back the same way when asked for with ``binary_data`` (per output) or
``binary_data_output`` (per request).

Every error answers ``{"error": "..."}``: 4xx for what the client can fix, 503 when the server
cannot take the request now, 500 (details only in the log) for the server's own faults.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from kiln.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from kiln.serve.protocol import (
    InferenceRequest, InferenceResponse, InternalError, InvalidRequest, RequestError,
    datatype_of, from_bytes, from_list, numpy_dtype, parse_shape, shared_memory_ref, to_bytes,
    to_list,
)
from kiln.serve.service import InferenceService
from kiln.serve.shared_memory import SharedMemoryRegions

log = logging.getLogger("kiln.serve.http")

HEADER_LENGTH = "Inference-Header-Content-Length"
COMPRESS_MIN_BYTES = 4096
_SERVICE = web.AppKey("service", InferenceService)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def inference_app(service: InferenceService, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_json_errors])
    app[_SERVICE] = service
    model = "/v2/models/{model}"
    version = model + "/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", _live),
        web.get("/v2/health/ready", _ready),
        web.get("/v2", _server_metadata),
        web.post("/v2/repository/index", _index),
        web.post("/v2/repository/models/{model}/load", _load),
        web.post("/v2/repository/models/{model}/unload", _unload),
        web.get("/v2/systemsharedmemory/status", _shared_memory_status),
        web.get("/v2/systemsharedmemory/region/{region}/status", _shared_memory_status),
        web.post("/v2/systemsharedmemory/region/{region}/register", _shared_memory_register),
        web.post("/v2/systemsharedmemory/unregister", _shared_memory_unregister),
        web.post("/v2/systemsharedmemory/region/{region}/unregister", _shared_memory_unregister),
    ])
    for prefix in (model, version):
        app.add_routes([
            web.get(prefix, _model_metadata),
            web.get(prefix + "/ready", _model_ready),
            web.get(prefix + "/config", _model_config),
            web.post(prefix + "/infer", _infer),
        ])
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application(middlewares=[_json_errors])
    app.add_routes([web.get("/metrics", scrape)])
    return app


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as error:
        if isinstance(error, InternalError):
            log.error("%s %s: internal error", request.method, request.path)
        return _error(error.http_status, str(error))
    except web.HTTPException as error:  # aiohttp's own: unknown route, method, body too large
        if error.status < 400:
            raise
        return _error(error.status, error.text or error.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, str(InternalError()))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _service(request: web.Request) -> InferenceService:
    return request.app[_SERVICE]


async def _live(request: web.Request) -> web.Response:
    return web.Response()


async def _ready(request: web.Request) -> web.Response:
    if not _service(request).ready:
        return _error(400, "the server is not ready")
    return web.Response()


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(_service(request).server_metadata())


async def _model_metadata(request: web.Request) -> web.Response:
    name, version = _model_route(request)
    return web.json_response(_service(request).model_metadata(name, version))


async def _model_ready(request: web.Request) -> web.Response:
    name, version = _model_route(request)
    if not _service(request).model_ready(name, version):
        return _error(400, f"model {name!r} {'version ' + version + ' ' if version else ''}is not ready")
    return web.Response()


async def _model_config(request: web.Request) -> web.Response:
    name, version = _model_route(request)
    config = _service(request).model_version(name, version).config
    return web.json_response(json_format.MessageToDict(config, preserving_proto_field_name=True))


async def _index(request: web.Request) -> web.Response:
    body = await _json_body(request, required=False)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequest("'ready' must be true or false")
    return web.json_response(_service(request).index(ready_only=ready))


async def _load(request: web.Request) -> web.Response:
    body = await _json_body(request, required=False)
    if body.get("parameters"):
        raise InvalidRequest("kiln serve loads models from the repository only: no load parameters")
    await _service(request).load(request.match_info["model"])
    return web.Response()


async def _unload(request: web.Request) -> web.Response:
    await _json_body(request, required=False)
    await _service(request).unload(request.match_info["model"])
    return web.Response()


async def _shared_memory_status(request: web.Request) -> web.Response:
    regions = _service(request).shared_memory.status(request.match_info.get("region", ""))
    return web.json_response(regions)


async def _shared_memory_register(request: web.Request) -> web.Response:
    body = await _json_body(request)
    key = body.get("key")
    if not isinstance(key, str):
        raise InvalidRequest("'key' must name a shared memory object")
    region = request.match_info["region"]
    _service(request).shared_memory.register(region, key, body.get("offset", 0), body.get("byte_size"))
    return web.Response()


async def _shared_memory_unregister(request: web.Request) -> web.Response:
    await _json_body(request, required=False)
    _service(request).shared_memory.unregister(request.match_info.get("region", ""))
    return web.Response()


async def _infer(request: web.Request) -> web.Response:
    name, version = _model_route(request)
    body = await request.read()
    header, binary = _split_body(request, body)
    infer_request = parse_infer_request(
        name, version, _parse_json(header), binary, _service(request).shared_memory
    )
    response = _infer_response(await _service(request).infer(infer_request), infer_request)
    # gzip or deflate as the client accepts (the header length counts the JSON before
    # compression, as tritonclient expects); small bodies would gain less than they cost
    if request.headers.get("Accept-Encoding") and len(response.body) >= COMPRESS_MIN_BYTES:
        response.enable_compression()
    return response


def _model_route(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


async def _json_body(request: web.Request, required: bool = True) -> dict:
    body = await request.read()
    if not body and not required:
        return {}
    payload = _parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return payload


def _parse_json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None


def _split_body(request: web.Request, body: bytes) -> tuple[memoryview, memoryview]:
    view = memoryview(body)
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        return view, view[len(view):]
    if not length.isdigit() or int(length) > len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} must be a byte count within the body, not {length!r}")
    return view[:int(length)], view[int(length):]


def parse_infer_request(
    model: str, version: str, payload: Any, binary: memoryview, shared_memory: SharedMemoryRegions
) -> InferenceRequest:
    """An inference request from its JSON header and the binary data after it (or the shared
    memory regions its tensors name)."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the inference request must be a JSON object")
    request_id = payload.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    parameters = _parameters(payload, "the request")
    timeout = parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise InvalidRequest("parameter 'timeout' must be a non-negative number of microseconds")
    binary_default = _flag(parameters, "binary_data_output", "the request")
    entries = payload.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest("'inputs' must be a non-empty list")
    inputs, offset = {}, 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("each input must be an object with a 'name'")
        name = entry["name"]
        if name in inputs:
            raise InvalidRequest(f"input {name!r} is given twice")
        shape = parse_shape(name, entry.get("shape"))
        datatype = entry.get("datatype")
        numpy_dtype(name, datatype)
        input_parameters = _parameters(entry, f"input {name!r}")
        size = input_parameters.get("binary_data_size")
        ref = shared_memory_ref(name, input_parameters)
        if ref is not None:
            if "data" in entry or size is not None:
                raise InvalidRequest(f"input {name!r} has both data and a shared memory region")
            inputs[name] = from_bytes(name, datatype, shape, shared_memory.read(name, ref), copy=False)
            continue
        if size is None:
            if "data" not in entry:
                raise InvalidRequest(f"input {name!r} has neither 'data' nor a 'binary_data_size'")
            inputs[name] = from_list(name, datatype, shape, entry["data"])
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
        if "data" in entry:
            raise InvalidRequest(f"input {name!r} has both 'data' and a 'binary_data_size'")
        if offset + size > len(binary):
            raise InvalidRequest(
                f"input {name!r}: its binary data ends at byte {offset + size} of {len(binary)} sent"
            )
        inputs[name] = from_bytes(name, datatype, shape, binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    request = InferenceRequest(
        model, version, inputs, id=request_id, timeout_us=timeout, binary_output_default=binary_default
    )
    outputs = payload.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidRequest("'outputs' must be a list")
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("each requested output must be an object with a 'name'")
        name = entry["name"]
        output_parameters = _parameters(entry, f"output {name!r}")
        if "classification" in output_parameters:
            raise InvalidRequest("kiln serve does not implement the classification extension")
        request.outputs.append(name)
        ref = shared_memory_ref(name, output_parameters)
        if ref is not None:
            request.shared_memory_outputs[name] = ref
        elif "binary_data" in output_parameters:
            request.binary_outputs[name] = _flag(output_parameters, "binary_data", f"output {name!r}")
    return request


def _parameters(entry: dict, owner: str) -> dict:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"'parameters' of {owner} must be an object")
    return parameters


def _flag(parameters: dict, key: str, owner: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter {key!r} of {owner} must be true or false")
    return value


def _infer_response(response: InferenceResponse, request: InferenceRequest) -> web.Response:
    outputs, chunks = [], []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {
            "name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)
        }
        ref = response.shared_memory.get(name)
        if ref is not None:
            entry["parameters"] = ref.parameters()
        elif request.binary_outputs.get(name, request.binary_output_default):
            chunk = to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = to_list(array)
        outputs.append(entry)
    payload: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id:
        payload["id"] = response.id
    payload["outputs"] = outputs
    header = json.dumps(payload, separators=(",", ":")).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join([header, *chunks]),
        headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )
