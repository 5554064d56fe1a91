"""``kiln serve REPO``: serve a Triton-style model repository over KServe v2 (HTTP and gRPC)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kiln.serve import Server

HELP = "serve a model repository over the KServe v2 protocol (HTTP, gRPC) with dynamic batching"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repository", help="model repository: REPO/<model>/config.pbtxt and REPO/<model>/<version>/model.kiln"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    for name, port, what in (("http", 8000, "KServe v2 HTTP"), ("grpc", 8001, "KServe v2 gRPC"),
                             ("metrics", 8002, "Prometheus /metrics")):
        parser.add_argument(
            f"--{name}-port", type=int, default=port, metavar="PORT",
            help=f"{what} port (default: {port}; 0: any free one)",
        )
    parser.add_argument(
        "--max-request-bytes", type=int, default=64 * 2**20, metavar="N",
        help="largest request body accepted, in bytes (default: 64 MiB)",
    )
    parser.add_argument(
        "--cpu-threads", type=int, metavar="N",
        help="threads each CPU instance computes with (default: torch's choice); with several "
        "instances, 1 avoids them fighting over the cores",
    )


def main(args: argparse.Namespace) -> int:
    # The server's libraries (grpc, aiohttp, the protocol stubs) load only when serving.
    from kiln.serve import ServeError, ServerOptions, run

    try:
        options = ServerOptions(
            host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, max_request_bytes=args.max_request_bytes,
        )
    except ServeError as error:
        args.usage_error(str(error))
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            args.usage_error("--cpu-threads must be at least 1")
        torch.set_num_threads(args.cpu_threads)
    run(args.repository, options, on_ready=_print_banner)
    return 0


def _print_banner(server: Server) -> None:
    table = Table(title=f"kiln serve {server.repository.root}")
    for column in ("model", "version", "state", "reason"):
        table.add_column(column)
    for entry in server.service.index():
        table.add_row(entry["name"], entry["version"], entry["state"], entry["reason"])
    console = Console()
    console.print(table)
    host = server.options.host
    console.print(
        f"HTTP {host}:{server.ports['http']}  gRPC {host}:{server.ports['grpc']}  "
        f"metrics http://{host}:{server.ports['metrics']}/metrics  (Ctrl-C to stop)",
        highlight=False,
    )
