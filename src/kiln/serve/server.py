"""The server's lifecycle: load the repository, listen (HTTP, gRPC, metrics), and on SIGTERM or
SIGINT refuse new requests, finish the accepted ones and stop, all within 30 seconds.

:func:`run` serves in the foreground until a signal; :class:`BackgroundServer` serves from a
thread of its own, for tests and for programs that embed the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiohttp import web
from tritonclient.grpc import service_pb2_grpc

from kiln.errors import KilnError
from kiln.serve.grpc import Servicer
from kiln.serve.http import inference_app, metrics_app
from kiln.serve.metrics import Metrics
from kiln.serve.repository import ModelRepository
from kiln.serve.service import InferenceService

log = logging.getLogger("kiln.serve.server")


class ServeError(KilnError):
    """The server cannot start: a port is taken, an option is invalid."""


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: any free port (see Server.ports)
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_request_bytes: int = 64 * 2**20
    drain_timeout_s: float = 20.0  # accepted requests get this long to finish at shutdown
    stop_timeout_s: float = 8.0  # then the workers and listeners this long to stop

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ServeError(f"{name.replace('_', '-')} must be a port from 0 to 65535")
        if self.max_request_bytes < 1024:
            raise ServeError("max-request-bytes must be at least 1024")


class Server:
    """The server on the running event loop: ``await start()``, then ``await stop()``."""

    def __init__(self, repository: str | os.PathLike, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.metrics = Metrics()
        self.repository = ModelRepository(repository)
        self.service: InferenceService | None = None
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self._grpc: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Load every model of the repository, then listen."""
        options = self.options
        self.service = InferenceService(self.repository, self.metrics)
        try:
            await self.service.load_all()
            self.ports["http"] = await self._serve_app(
                inference_app(self.service, options.max_request_bytes), options.http_port
            )
            self.ports["metrics"] = await self._serve_app(metrics_app(self.metrics), options.metrics_port)
            self.ports["grpc"] = await self._serve_grpc(options.grpc_port)
        except BaseException:
            await self.stop()
            raise
        log.info("serving on %s: %s", options.host, self.ports)

    async def stop(self) -> None:
        """Refuse new requests, finish the accepted ones, close the listeners, stop the workers."""
        if self.service is None:
            return
        if not await self.service.drain(self.options.drain_timeout_s):
            log.warning("stopping with requests still running after %.0f s", self.options.drain_timeout_s)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for runner in self._runners:
            await runner.cleanup()
        await self.service.close(self.options.stop_timeout_s)
        self.service = None

    async def _serve_app(self, app: web.Application, port: int) -> int:
        # access_log off: a line per request costs more than a small inference
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        sock = self._bind(port)
        await web.SockSite(runner, sock).start()
        return sock.getsockname()[1]

    def _bind(self, port: int) -> socket.socket:
        host = self.options.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise ServeError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        return sock

    async def _serve_grpc(self, port: int) -> int:
        limit = self.options.max_request_bytes
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared one
        ])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(self.service), self._grpc)
        host = self.options.host
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._grpc.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ServeError(f"cannot listen on {address} for gRPC: the port is taken or the address invalid")
        await self._grpc.start()
        return bound


def run(
    repository: str | os.PathLike, options: ServerOptions | None = None,
    on_ready: Callable[[Server], None] | None = None,
) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(repository, options)
    asyncio.run(_serve_until_signal(server, on_ready))


async def _serve_until_signal(server: Server, on_ready: Callable[[Server], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    if on_ready:
        on_ready(server)
    await stop.wait()
    log.warning("shutting down: refusing new requests, finishing accepted ones")
    await server.stop()


class BackgroundServer:
    """A Server on an event loop of its own thread; ``with BackgroundServer(repo) as server:``."""

    def __init__(self, repository: str | os.PathLike, options: ServerOptions | None = None) -> None:
        self.server = Server(repository, options)
        self._thread = threading.Thread(target=self._main, name="kiln-serve", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def ports(self) -> dict[str, int]:
        return self.server.ports

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as error:
            self._error = error
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop()
