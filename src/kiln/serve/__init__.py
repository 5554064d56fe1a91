"""``kiln serve``: engines behind the KServe v2 / Open Inference Protocol, over HTTP and gRPC,
with Triton's model repository layout, dynamic batching and Prometheus metrics."""

from kiln.serve.repository import ModelLoadError, ModelRepository, RepositoryError
from kiln.serve.server import BackgroundServer, Server, ServeError, ServerOptions, run

__all__ = [
    "BackgroundServer", "ModelLoadError", "ModelRepository", "RepositoryError", "ServeError",
    "Server", "ServerOptions", "run",
]
