"""KServe v2 over gRPC: ``inference.GRPCInferenceService`` with the messages Triton's client
ships (``tritonclient.grpc.service_pb2``), served by grpc.aio on the server's event loop.

Inputs come as ``raw_input_contents`` (one little-endian buffer per input not in shared
memory), typed ``contents``, or from a registered system shared memory region; outputs go back
as ``raw_output_contents``, or into the region a requested output names. Errors map to status codes:
INVALID_ARGUMENT and NOT_FOUND for the client's mistakes, UNAVAILABLE when the server cannot
take the request now, INTERNAL (details only in the log) for the server's own faults.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from kiln.serve.protocol import (
    InferenceRequest, InternalError, InvalidRequest, RequestError,
    datatype_of, from_bytes, from_list, numpy_dtype, parse_shape, shared_memory_ref, to_bytes,
)
from kiln.serve.service import InferenceService
from kiln.serve.shared_memory import SharedMemoryRegions

log = logging.getLogger("kiln.serve.grpc")

# The typed field of InferTensorContents that carries each datatype (FP16, BF16: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer a RequestError with its status code, and anything else with INTERNAL."""

    @functools.wraps(method)
    async def handle(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except RequestError as error:
            await context.abort(getattr(grpc.StatusCode, error.grpc_code), str(error))
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, str(InternalError()))

    return handle


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    @_rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        metadata = self.service.model_metadata(request.name, request.version)
        tensors = {
            key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata[key]]
            for key in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"], **tensors
        )

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.service.model_version(request.name, request.version).config)

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        response = await self.service.infer(parse_infer_request(request, self.service.shared_memory))
        reply = pb.ModelInferResponse(
            model_name=response.model, model_version=response.version, id=response.id
        )
        for name, array in response.outputs.items():
            tensor = reply.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            ref = response.shared_memory.get(name)
            if ref is None:
                reply.raw_output_contents.append(to_bytes(array))
                continue
            for key, value in ref.parameters().items():
                field = "string_param" if isinstance(value, str) else "int64_param"
                setattr(tensor.parameters[key], field, value)
            reply.raw_output_contents.append(b"")  # keeps raw_output_contents aligned with outputs
        return reply

    @_rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.service.shared_memory.status(request.name):
            reply.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return reply

    @_rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.service.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.service.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        models = [pb.RepositoryIndexResponse.ModelIndex(**e) for e in self.service.index(request.ready)]
        return pb.RepositoryIndexResponse(models=models)

    @_rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidRequest("kiln serve loads models from the repository only: no load parameters")
        await self.service.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.service.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def parse_infer_request(message: pb.ModelInferRequest, shared_memory: SharedMemoryRegions) -> InferenceRequest:
    if not message.inputs:
        raise InvalidRequest("the request has no inputs")
    refs = {t.name: shared_memory_ref(t.name, _parameters(t.parameters)) for t in message.inputs}
    raw = message.raw_input_contents
    carried = sum(ref is None for ref in refs.values())  # inputs not in shared memory
    if raw and len(raw) != carried:
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {carried} inputs not in shared memory")
    inputs, raw_index = {}, 0
    for tensor in message.inputs:
        name = tensor.name
        if name in inputs:
            raise InvalidRequest(f"input {name!r} is given twice")
        shape = parse_shape(name, list(tensor.shape))
        numpy_dtype(name, tensor.datatype)
        if refs[name] is not None:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name!r} has both contents and a shared memory region")
            data = shared_memory.read(name, refs[name])
            inputs[name] = from_bytes(name, tensor.datatype, shape, data, copy=False)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name!r} has both contents and raw_input_contents")
            inputs[name] = from_bytes(name, tensor.datatype, shape, raw[raw_index])
            raw_index += 1
        else:
            inputs[name] = _from_contents(name, tensor.datatype, shape, tensor.contents)
    timeout = message.parameters["timeout"].int64_param if "timeout" in message.parameters else None
    if timeout is not None and timeout < 0:
        raise InvalidRequest("parameter 'timeout' must be a non-negative number of microseconds")
    request = InferenceRequest(
        message.model_name, message.model_version, inputs,
        outputs=[output.name for output in message.outputs], id=message.id, timeout_us=timeout,
    )
    for output in message.outputs:
        ref = shared_memory_ref(output.name, _parameters(output.parameters))
        if ref is not None:
            request.shared_memory_outputs[output.name] = ref
    return request


def _parameters(parameters: Any) -> dict[str, Any]:
    """A map of InferParameter messages as plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in parameters.items()}


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    if datatype not in _CONTENTS_FIELD:
        raise InvalidRequest(f"input {name!r}: {datatype} travels in raw_input_contents only")
    values = list(getattr(contents, _CONTENTS_FIELD[datatype]))
    if datatype == "BYTES":
        if len(values) != math.prod(shape):
            raise InvalidRequest(f"input {name!r}: {len(values)} elements for shape {list(shape)}")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    return from_list(name, datatype, shape, values)
