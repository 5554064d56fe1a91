"""``kiln bench ENGINE|MODEL``: throughput and latency, as trtexec reports them, and peers alike.

Each run goes NumPy in, NumPy out: host to device, compute, device to host; with
``--no-data-transfers`` (trtexec's option) the inputs are on the GPU before timing starts and the
outputs stay there, so the figures are the GPU's alone, as ``benchmarks/peers.py`` measures them.
On cuda the device times come from CUDA events and the enqueue time is the host time of the
compute phase; on cpu everything is read with ``perf_counter``. Peers (``--vs``) run on the same
inputs the same way; the PyTorch peers compute in the engine's float type (fp16 for fp16, int8
and fp8 engines on cuda, bf16 for bf16 ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli.options import (
    add_build_arguments, add_input_arguments, engine_from, inputs_for, is_onnx_model,
)
from kiln.cli.runners import PEERS, KilnRunner, OnnxRuntimeRunner, Runner, TorchRunner, load_torch_module
from kiln.cli.stats import UNSTABLE_CV, summarize_ms
from kiln.frontend.onnx import read_onnx
from kiln.kernels.arithmetic import strict_fp32
from kiln.runtime.timing import DEVICE_TO_HOST, HOST_TO_DEVICE, Span, Timeline

HELP = "measure throughput and latency of an engine (or a model, built first), beside peers"
DEFAULT_DURATION_S = 3.0
DEFAULT_MIN_ITERATIONS = 10
PHASES = {  # report key -> span label
    "host_to_device_ms": HOST_TO_DEVICE,
    "device_to_host_ms": DEVICE_TO_HOST,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="ENGINE|MODEL", help="engine file, or ONNX model (.onnx)")
    add_input_arguments(parser)
    add_build_arguments(parser)
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--iterations", type=_positive_int, metavar="N",
        help=f"timed runs per stream, at least (default: {DEFAULT_MIN_ITERATIONS}, or as many as "
        f"--duration allows; without either, {DEFAULT_DURATION_S:g} s)",
    )
    timing.add_argument(
        "--duration", type=float, metavar="SECONDS", help="time each stream for at least this long"
    )
    timing.add_argument(
        "--warmup", type=int, default=10, metavar="N", help="untimed runs per stream first (10)"
    )
    timing.add_argument(
        "--streams", type=_positive_int, default=1, metavar="N",
        help="run N streams at once, each its own thread (and CUDA stream on cuda)",
    )
    timing.add_argument(
        "--no-data-transfers", action="store_true",
        help="cuda: inputs on the GPU before timing, outputs left there (time the GPU work alone)",
    )
    timing.add_argument(
        "--no-cuda-graph", action="store_true",
        help="run every layer's kernels one by one instead of replaying CUDA graphs",
    )
    parser.add_argument(
        "--vs", type=_peers, default=[], metavar="PEER,...",
        help=f"also time peers on the same inputs: {', '.join(PEERS)}",
    )
    parser.add_argument(
        "--torch-module", metavar="module.path:factory",
        help="PyTorch model for --vs torch/torch-compile: a callable returning an nn.Module, "
        "called with the inputs positionally in the model's input order",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass(frozen=True)
class Schedule:
    warmup: int
    iterations: int | None
    duration: float | None
    streams: int

    def done(self, runs: int, elapsed: float) -> bool:
        enough_runs = self.iterations is None or runs >= self.iterations
        long_enough = self.duration is None or elapsed >= self.duration
        return enough_runs and long_enough


@dataclass
class Measurement:
    runs: list[list[Span]]  # every timed run, of every stream
    seconds: float  # wall time from the first stream's start to the last one's end


def main(args: argparse.Namespace) -> int:
    wants_torch = any(peer.startswith("torch") for peer in args.vs)
    if wants_torch and not args.torch_module:
        args.usage_error("--vs torch/torch-compile needs --torch-module module.path:factory")
    if "onnxruntime" in args.vs and not is_onnx_model(args.target):
        args.usage_error("--vs onnxruntime needs the ONNX model: give MODEL.onnx, not an engine")
    schedule = _schedule(args)
    engine = engine_from(args.target, args)
    device = engine.device.type
    feed = inputs_for(engine, args)
    if args.no_data_transfers and device == "cuda":
        feed = {name: torch.from_numpy(value).to(device) for name, value in feed.items()}
    # Imported now, so that a wrong --torch-module fails before the timing, but moved to the
    # device only after kiln's peak memory is read.
    torch_module = load_torch_module(args.torch_module) if wants_torch else None

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    measured = measure(KilnRunner(engine), feed, schedule, device)
    report = _kiln_report(measured)
    report["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    result = {
        "target": args.target,
        "device": device,
        "inputs": {name: list(getattr(value, "shape", ())) for name, value in feed.items()},
        "streams": schedule.streams,
        "data_transfers": not (args.no_data_transfers and device == "cuda"),
        "warmup": schedule.warmup,
        **report,
        "cuda_graphs": {"requested": not args.no_cuda_graph, "used": engine.captured_signatures > 0},
        "vs": {},
    }
    for peer in _peers_for(args, engine, torch_module):
        other = _peer_report(measure(peer, feed, schedule, device))
        # Throughput, not latency: runs are enqueued back to back, so a per-run latency hides
        # what a peer's host side costs while the GPU is busy with the run before.
        other["kiln_speedup"] = round(report["throughput_qps"] / other["throughput_qps"], 4)
        other["provider"] = getattr(peer, "provider", None)  # where ONNX Runtime ran
        result["vs"][peer.name] = other
    result["warnings"] = _warnings(result)
    result["stable"] = not result["warnings"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


def measure(runner: Runner, feed: Mapping[str, Any], schedule: Schedule, device: str) -> Measurement:
    """Warm up and time ``runner`` on ``schedule.streams`` streams at once."""
    runner.infer(feed)  # a first run compiles whatever compiles lazily (torch.compile)
    if schedule.streams == 1:
        runs, start, end = _stream_loop(runner, feed, schedule, device, None)
        return Measurement(runs, end - start)
    barrier = threading.Barrier(schedule.streams)
    # One fp32 setting around all streams: each run's own would race with the others' restores.
    with strict_fp32(), ThreadPoolExecutor(schedule.streams) as pool:
        futures = [
            pool.submit(_stream_loop, runner, feed, schedule, device, barrier)
            for _ in range(schedule.streams)
        ]
        errors = [f.exception() for f in futures]
    # A stream that failed broke the barrier for the others: report the failure, not the barrier.
    failures = [e for e in errors if e is not None]
    if failures:
        raise next((e for e in failures if not isinstance(e, threading.BrokenBarrierError)), failures[0])
    results = [f.result() for f in futures]
    runs = [run for stream_runs, _, _ in results for run in stream_runs]
    return Measurement(runs, max(end for *_, end in results) - min(start for _, start, _ in results))


def _stream_loop(
    runner: Runner,
    feed: Mapping[str, Any],
    schedule: Schedule,
    device: str,
    barrier: threading.Barrier | None,
) -> tuple[list[list[Span]], float, float]:
    try:
        with _own_stream(device):
            for _ in range(schedule.warmup):
                runner.infer(feed)
            if barrier is not None:
                barrier.wait()
            timeline = Timeline(device)
            start = time.perf_counter()
            count = 0
            while not schedule.done(count, time.perf_counter() - start):
                runner.infer(feed, timeline)
                count += 1
            if device == "cuda":
                torch.cuda.current_stream().synchronize()
            end = time.perf_counter()
        return timeline.runs(), start, end
    except BaseException:
        if barrier is not None:
            barrier.abort()
        raise


@contextlib.contextmanager
def _own_stream(device: str) -> Iterator[None]:
    if device != "cuda":
        yield
        return
    with torch.cuda.stream(torch.cuda.Stream()):
        yield


def _kiln_report(measured: Measurement) -> dict[str, Any]:
    runs = measured.runs
    phases = {key: [_seconds(run, label) for run in runs] for key, label in PHASES.items()}
    latency = [sum(span.seconds for span in run) for run in runs]
    # Compute is everything between the copies: its spans are per layer when layers are timed.
    compute_spans = [[s for s in run if s.label not in PHASES.values()] for run in runs]
    return {
        "iterations": len(runs),
        "seconds": round(measured.seconds, 6),
        "throughput_qps": round(len(runs) / measured.seconds, 3),
        "latency_ms": summarize_ms(latency),
        "enqueue_ms": summarize_ms([sum(s.host_seconds for s in spans) for spans in compute_spans]),
        "host_to_device_ms": summarize_ms(phases["host_to_device_ms"]),
        "compute_ms": summarize_ms([sum(s.seconds for s in spans) for spans in compute_spans]),
        "device_to_host_ms": summarize_ms(phases["device_to_host_ms"]),
    }


def _peer_report(measured: Measurement) -> dict[str, Any]:
    return {
        "iterations": len(measured.runs),
        "seconds": round(measured.seconds, 6),
        "throughput_qps": round(len(measured.runs) / measured.seconds, 3),
        "latency_ms": summarize_ms([sum(span.seconds for span in run) for run in measured.runs]),
    }


def _seconds(run: list[Span], label: str) -> float:
    return sum(span.seconds for span in run if span.label == label)


def _warnings(result: dict[str, Any]) -> list[str]:
    warnings = []
    for name, report in [("kiln", result), *result["vs"].items()]:
        cv = report["latency_ms"]["cv"]
        if cv > UNSTABLE_CV:
            warnings.append(
                f"{name}: unstable timings, latency varies by {cv:.1%} (coefficient of variation "
                f"over {UNSTABLE_CV:.1%}); run longer (--duration) or on a quieter machine"
            )
    return warnings


def _peers_for(
    args: argparse.Namespace, engine: kiln.Engine, torch_module: torch.nn.Module | None
) -> Iterator[Runner]:
    """Each peer of ``--vs``, made only when its turn comes (so it holds no memory before)."""
    device = engine.device.type
    input_names = [info.name for info in engine.inputs]
    output_names = [info.name for info in engine.outputs]
    for peer in args.vs:
        if peer == "onnxruntime":
            yield OnnxRuntimeRunner(read_onnx(args.target), device)
        else:
            compiled = peer == "torch-compile"
            yield TorchRunner(torch_module, device, input_names, output_names, compiled=compiled,
                              dtype=_peer_dtype(engine, device))


def _schedule(args: argparse.Namespace) -> Schedule:
    iterations, duration = args.iterations, args.duration
    if iterations is None and duration is None:
        iterations, duration = DEFAULT_MIN_ITERATIONS, DEFAULT_DURATION_S
    return Schedule(max(args.warmup, 0), iterations, duration, args.streams)


def _peers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown peer {', '.join(unknown) or repr(text)}; choose from {', '.join(PEERS)}"
        )
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _print(result: dict[str, Any]) -> None:
    console = Console()
    inputs = ", ".join(f"{name}[{'x'.join(map(str, shape))}]" for name, shape in result["inputs"].items())
    console.print(
        f"[bold]{result['target']}[/] on {result['device']}, inputs {inputs}: "
        f"{result['iterations']} runs on {result['streams']} stream(s) in {result['seconds']:.2f} s, "
        f"[bold]{result['throughput_qps']:.1f}[/] runs/s"
    )
    table = Table(title="times (ms)")
    columns = ("min", "mean", "median", "p90", "p95", "p99")
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    rows = {
        "latency": "latency_ms", "enqueue": "enqueue_ms", "host to device": "host_to_device_ms",
        "compute": "compute_ms", "device to host": "device_to_host_ms",
    }
    for label, key in rows.items():
        table.add_row(label, *(f"{result[key][c]:.4f}" for c in columns))
    console.print(table)
    if result["peak_gpu_memory_bytes"] is not None:
        console.print(f"peak GPU memory: {result['peak_gpu_memory_bytes'] / 2**20:.1f} MiB")
    if result["vs"]:
        peers = Table(title="side by side (same inputs, NumPy in and out)")
        for column in ("runner", "median ms", "p99 ms", "runs/s", "kiln speedup"):
            peers.add_column(column, justify="left" if column == "runner" else "right")
        peers.add_row(
            "kiln", f"{result['latency_ms']['median']:.4f}", f"{result['latency_ms']['p99']:.4f}",
            f"{result['throughput_qps']:.1f}", "1.00x",
        )
        for name, other in result["vs"].items():
            provider = (other["provider"] or "").removesuffix("ExecutionProvider")
            label = f"{name} ({provider})" if provider else name
            peers.add_row(
                label, f"{other['latency_ms']['median']:.4f}", f"{other['latency_ms']['p99']:.4f}",
                f"{other['throughput_qps']:.1f}", f"{other['kiln_speedup']:.2f}x",
            )
        console.print(peers)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")


def _peer_dtype(engine: kiln.Engine, device: str) -> torch.dtype:
    """What the PyTorch peers compute in: the engine's float type (its unquantized layers' type
    for int8/fp8 engines on cuda)."""
    precision = engine.manifest.get("precision", "fp32")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" or (device == "cuda" and precision in ("int8", "fp8")):
        return torch.float16
    return torch.float32
