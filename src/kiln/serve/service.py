"""The inference service both frontends call: which model versions serve, loading and unloading
them, readiness, and inference with its accounting. It knows no wire format.

Loading happens on a worker thread and swaps the result in on the event loop, so requests keep
flowing while a model loads. A version that fails to load never replaces one that serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version

from tritonclient.grpc import model_config_pb2

from kiln.errors import KilnError
from kiln.serve.metrics import Metrics
from kiln.serve.model import PLATFORM, ModelVersion
from kiln.serve.protocol import (
    InferenceRequest, InferenceResponse, InvalidRequest, NotFound, RequestError, SharedMemoryRef,
    Unavailable,
)
from kiln.serve.repository import ModelRepository, select_versions
from kiln.serve.shared_memory import SharedMemoryRegions

log = logging.getLogger("kiln.serve.service")

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "system_shared_memory"]
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


@dataclass
class ModelState:
    """What the service knows of one model: the versions serving and the fate of each load."""

    config: model_config_pb2.ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    error: str = ""  # why the model as a whole did not (re)load
    wanted: bool = True  # False once unloaded: its absence does not make the server unready


class InferenceService:
    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self.repository = repository
        self.metrics = metrics
        self.shared_memory = SharedMemoryRegions()
        self.accepting = True
        self._models: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- readiness and metadata ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Accepting requests, and every model meant to serve has a ready version."""
        return self.accepting and all(s.versions or not s.wanted for s in self._models.values())

    def server_metadata(self) -> dict:
        try:
            kiln_version = package_version("kiln")
        except PackageNotFoundError:  # running from a source tree
            kiln_version = "unknown"
        return {"name": SERVER_NAME, "version": kiln_version, "extensions": EXTENSIONS}

    def model_version(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves ``version`` of model ``name`` ("": the newest ready one)."""
        state = self._models.get(name)
        if state is None or not state.versions:
            reason = f": {state.error}" if state and state.error else ""
            raise NotFound(f"model {name!r} is not loaded{reason}")
        if not version:
            return state.versions[max(state.versions)]
        if not version.isdigit():
            raise InvalidRequest(f"model version {version!r} is not a number")
        if int(version) not in state.versions:
            raise NotFound(f"model {name!r} has no ready version {version}")
        return state.versions[int(version)]

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.model_version(name, version)
        except RequestError:
            return False
        return self.accepting

    def model_metadata(self, name: str, version: str = "") -> dict:
        served = self.model_version(name, version)
        versions = [str(served.version)] if version else [str(v) for v in sorted(self._models[name].versions)]
        return {
            "name": name, "versions": versions, "platform": PLATFORM,
            "inputs": served.tensor_metadata(served.inputs),
            "outputs": served.tensor_metadata(served.outputs),
        }

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index: every model on disk with the state of each version."""
        entries = []
        for name in sorted(set(self.repository.model_names()) | set(self._models)):
            state = self._models.get(name)
            if state is None:
                entries.append({"name": name, "version": "", "state": "", "reason": ""})
                continue
            for number, status in sorted(state.status.items()):
                entries.append(
                    {"name": name, "version": str(number), "state": status.state, "reason": status.reason}
                )
            if state.error:
                entries.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": state.error})
        return [e for e in entries if e["state"] == READY] if ready_only else entries

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if not self.accepting:
            raise Unavailable("the server is shutting down")
        for name, ref in request.shared_memory_outputs.items():  # fail before running, not after
            self.shared_memory.locate(name, ref)
        served = self.model_version(request.model, request.version)
        started = time.perf_counter()
        self._in_flight += 1
        self._idle.clear()
        try:
            outputs = await asyncio.wrap_future(served.submit(request))
        except RequestError:
            served.metrics.request_done(False, time.perf_counter() - started)
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        names = request.outputs or list(served.outputs)
        written = {}
        try:
            for name, ref in request.shared_memory_outputs.items():
                size = self.shared_memory.write(name, ref, outputs[name])
                written[name] = SharedMemoryRef(ref.region, size, ref.offset)
        except RequestError:
            served.metrics.request_done(False, time.perf_counter() - started)
            raise
        served.metrics.request_done(True, time.perf_counter() - started)
        return InferenceResponse(
            request.model, str(served.version), request.id, {n: outputs[n] for n in names}, written
        )

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for accepted ones; False if some are still running."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- loading -----------------------------------------------------------------------------

    async def load_all(self) -> None:
        for name in self.repository.model_names():
            try:
                await self.load(name)
            except InvalidRequest:
                pass  # logged while loading, and reported by the index: the other models serve

    async def load(self, name: str) -> None:
        """(Re)load a model from the repository; raise InvalidRequest when some version failed."""
        self.repository.model_dir(name)  # an invalid or unknown name fails here, before any work
        loop = asyncio.get_running_loop()
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self._models.get(name, ModelState())
            state, retired = await loop.run_in_executor(None, self._prepare, name, old)
            self._models[name] = state
        await self._retire(retired)
        failures = [f"version {v}: {s.reason}" for v, s in state.status.items() if s.reason]
        if state.error or failures:
            raise InvalidRequest(f"failed to load model {name!r}: {state.error or '; '.join(failures)}")

    async def unload(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            state = self._models.get(name)
            if state is None or not state.wanted:
                raise NotFound(f"model {name!r} is not loaded")
            retired = list(state.versions.values())
            unloaded = {v: VersionStatus(UNAVAILABLE, "unloaded") for v in state.versions}
            self._models[name] = ModelState(config=state.config, status=unloaded, wanted=False)
        await self._retire(retired)

    async def close(self, timeout_s: float) -> None:
        """Stop every version's workers once they have run what they queued."""
        retired = [v for state in self._models.values() for v in state.versions.values()]
        self._models.clear()
        await self._retire(retired, timeout_s)

    async def _retire(self, versions: list[ModelVersion], timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, v.batcher.close, timeout_s) for v in versions))

    def _prepare(self, name: str, old: ModelState) -> tuple[ModelState, list[ModelVersion]]:
        """On a worker thread: load what the config asks for; return the new state and the
        versions it replaces. Versions that serve keep serving if anything fails."""
        try:
            config = self.repository.read_config(name)
            on_disk = self.repository.versions_on_disk(name)
        except KilnError as error:
            log.warning("model %s: %s", name, error)
            return ModelState(old.config, old.versions, old.status, str(error)), []
        state = ModelState(config)
        for number in select_versions(config, on_disk):
            if number not in on_disk:
                state.status[number] = VersionStatus(
                    UNAVAILABLE, f"version {number} is not in the repository"
                )
                continue
            try:
                served = ModelVersion.load(
                    self.repository, name, number, config, self.metrics.model(name, number)
                )
            except KilnError as error:
                log.warning("model %s version %d failed to load: %s", name, number, error)
                state.status[number] = VersionStatus(UNAVAILABLE, str(error))
                continue
            except Exception:
                log.exception("model %s version %d failed to load", name, number)
                state.status[number] = VersionStatus(UNAVAILABLE, "internal error; see the server log")
                continue
            state.versions[number] = served
            state.status[number] = VersionStatus(READY)
        failures = {n: s.reason for n, s in state.status.items() if s.state != READY}
        if not state.status:
            state.error = "no version directory holds model.kiln or model.onnx"
        retired = []
        for number, current in old.versions.items():
            if number in state.versions or not (failures or state.error):
                retired.append(current)  # replaced by a fresh load, or no longer asked for
                continue
            state.versions[number] = current  # the previous load keeps serving
            failure = failures.get(number)
            reason = f"the previous load serves; reloading failed: {failure}" if failure else ""
            state.status[number] = VersionStatus(READY, reason)
        log.info("model %s: %s", name, ", ".join(f"v{v} {s.state}" for v, s in sorted(state.status.items())))
        return state, retired
