"""Load test of ``kiln serve``: a fixed number of concurrent clients for a fixed time, with and
without dynamic batching, then the server's memory over a run of requests.

    .venv/bin/python benchmarks/serve_load.py                    # concurrency 32, 60 s per phase
    .venv/bin/python benchmarks/serve_load.py --duration 5 --rss-requests 2000

It builds a CPU engine (a deep, narrow MLP: its cost per execution hardly grows with the batch,
as with most small models on a GPU), writes a repository with the model twice (with and without
``dynamic_batching``), starts ``kiln serve`` on free local ports, and drives it with
``tritonclient``'s asyncio HTTP client. It prints QPS, p50 and p99 latency and the server's
``nv_inference_exec_count`` for each phase, and the server's RSS growth over ``--rss-requests``
requests. Exit status 1 when a check fails: any error, ``exec_count`` not well below the request
count with batching, batching not faster, or RSS growth of 50 MiB or more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import kiln

WIDTH, DEPTH, MAX_BATCH = 64, 64, 32
RSS_LIMIT_MIB = 50


def deep_mlp() -> object:
    """x[batch, 64] -> DEPTH x (MatMul, Add, Relu) -> y."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for layer in range(DEPTH):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{layer}"),
                    numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{layer}")]
        nodes += [helper.make_node("MatMul", [previous, f"w{layer}"], [f"m{layer}"]),
                  helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"]),
                  helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"])]
        previous = f"r{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes, "deep_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONFIG = """
name: "{name}"
max_batch_size: {max_batch}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {width} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {width} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{batching}
"""


def write_repository(root: Path) -> None:
    engine = kiln.build(deep_mlp(), device="cpu")
    for name, batching in (
        ("batched", "dynamic_batching { max_queue_delay_microseconds: 2000 }"),
        ("unbatched", ""),
    ):
        (root / name / "1").mkdir(parents=True)
        engine.save(root / name / "1" / "model.kiln")
        (root / name / "config.pbtxt").write_text(
            CONFIG.format(name=name, max_batch=MAX_BATCH, width=WIDTH, batching=batching)
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repository: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    command = [
        sys.executable, "-m", "kiln.cli.main", "serve", str(repository),
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--metrics-port", str(ports["metrics"]), "--cpu-threads", "1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kiln serve exited with status {server.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=1)
            return server, ports
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("kiln serve did not become ready within 60 s")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def scrape(port: int, metric: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    match = re.search(rf'^{metric}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def drive(
    url: str, model: str, concurrency: int, duration_s: float | None, requests: int | None
) -> dict:
    """``concurrency`` clients, each sending one request after another, until the time or the
    request count runs out. Latencies in seconds."""
    import tritonclient.http.aio as httpclient

    latencies, errors = [], []
    batch = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
    client = httpclient.InferenceServerClient(url, conn_limit=concurrency)
    stop_at = None if duration_s is None else time.perf_counter() + duration_s
    remaining = [requests]

    def more() -> bool:
        if stop_at is not None:
            return time.perf_counter() < stop_at
        remaining[0] -= 1
        return remaining[0] >= 0

    async def one_client() -> None:
        tensor = httpclient.InferInput("x", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        while more():
            started = time.perf_counter()
            try:
                await client.infer(model, [tensor])
            except Exception as error:  # counted and reported: the load test must see 0
                errors.append(repr(error))
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finally:
        await client.close()
    elapsed = time.perf_counter() - started
    return {"latencies": np.array(latencies), "errors": errors, "elapsed": elapsed}


def phase(ports: dict[str, int], model: str, args: argparse.Namespace) -> dict:
    url = f"127.0.0.1:{ports['http']}"
    asyncio.run(drive(url, model, args.concurrency, args.warmup, None))
    success_before = scrape(ports["metrics"], "nv_inference_request_success", model)
    exec_before = scrape(ports["metrics"], "nv_inference_exec_count", model)
    result = asyncio.run(drive(url, model, args.concurrency, args.duration, None))
    result["requests"] = scrape(ports["metrics"], "nv_inference_request_success", model) - success_before
    result["executions"] = scrape(ports["metrics"], "nv_inference_exec_count", model) - exec_before
    result["qps"] = len(result["latencies"]) / result["elapsed"]
    return result


def report(model: str, result: dict) -> None:
    latencies = result["latencies"] * 1e3
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"),) * 2
    print(
        f"{model:>10}: {len(latencies):7d} requests  {len(result['errors'])} errors  "
        f"QPS {result['qps']:8.1f}  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
        f"exec_count {result['executions']:.0f} for {result['requests']:.0f} requests"
    )
    for error in result["errors"][:3]:
        print(f"    error: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase (default: 60)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per phase")
    parser.add_argument("--rss-requests", type=int, default=10_000, help="requests of the RSS phase")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kiln-serve-load-") as tmp:
        repository = Path(tmp)
        write_repository(repository)
        server, ports = start_server(repository)
        try:
            print(f"kiln serve load test: concurrency {args.concurrency}, {args.duration:g} s per phase, "
                  f"{os.cpu_count()} CPUs, model {DEPTH} x {WIDTH}-wide MLP, max_batch_size {MAX_BATCH}")
            batched = phase(ports, "batched", args)
            report("batched", batched)
            unbatched = phase(ports, "unbatched", args)
            report("unbatched", unbatched)
            rss_before = rss_mib(server.pid)
            rss_run = asyncio.run(drive(
                f"127.0.0.1:{ports['http']}", "batched", args.concurrency, None, args.rss_requests
            ))
            rss_growth = rss_mib(server.pid) - rss_before
            print(f"server RSS {rss_before:.1f} MiB, growth over {args.rss_requests} requests: "
                  f"{rss_growth:+.1f} MiB ({len(rss_run['errors'])} errors)")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

    checks = {
        "no errors": not (batched["errors"] or unbatched["errors"] or rss_run["errors"]),
        "batching executes well below the request count":
            batched["executions"] <= batched["requests"] / 2,
        "batching gives a higher QPS": batched["qps"] > unbatched["qps"],
        f"RSS growth below {RSS_LIMIT_MIB} MiB": rss_growth < RSS_LIMIT_MIB,
    }
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
