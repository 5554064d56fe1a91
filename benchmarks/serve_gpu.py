"""``kiln serve`` on the GPU against ``kiln bench``: ResNet-50 FP16, many concurrent clients.

    python benchmarks/serve_gpu.py                       # concurrency 64, 30 s, one image a request
    python benchmarks/serve_gpu.py --shared-memory system --request-batch 8

It exports torchvision's ResNet-50 (random weights) with a symbolic batch, builds an FP16 engine
for batches 1 to 64 on cuda, writes a repository with ``max_batch_size: 64``, dynamic batching,
``--instances`` GPU instances and a ``model_warmup`` sample of every batch size, starts
``kiln serve`` and drives it over gRPC (``tritonclient``'s asyncio client) from several client
processes. Each request carries ``--request-batch`` images, as raw tensor bytes or (with
``--shared-memory system``) in a system shared memory region of the client's. The server's ``nv_inference_count / nv_inference_exec_count`` is the batch size
the dynamic batcher formed on average; ``kiln bench`` then times the same engine at that batch
size (and at 64) with as many streams as instances, NumPy in and NumPy out as the server runs it.
The figure of merit is the served images/s over ``kiln bench``'s images/s at the matching batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import kiln

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import scrape, start_server  # noqa: E402  (a sibling script, not a package)

MAX_BATCH = 64
PROCESS_START_S = 10.0  # time for the client processes to start (imports) before the load begins
IMAGE = (3, 224, 224)
CONFIG = """
name: "resnet50"
max_batch_size: {max_batch}
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 1000 ] }} ]
instance_group [ {{ count: {instances} kind: {kind} }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
"""
# every batch size the batcher may form is captured as a CUDA graph before the server is ready
WARMUP = """model_warmup [ {{ name: "b{batch}" batch_size: {batch} inputs {{ key: "input" value: {{
  data_type: TYPE_FP32 dims: [ 3, 224, 224 ] random_data: true }} }} }} ]
"""


def build_engine(root: Path, device: str) -> Path:
    """ResNet-50 with a symbolic batch, built FP16 for batches 1..64; returns the engine path."""
    model = torchvision.models.resnet50().eval()
    onnx_path = root / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, *IMAGE),), onnx_path, dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    profile = kiln.Profile({"input": ((1, *IMAGE), (MAX_BATCH, *IMAGE), (MAX_BATCH, *IMAGE))})
    started = time.perf_counter()
    engine = kiln.build(str(onnx_path), device=device, precision="fp16", profiles=[profile])
    print(f"built the FP16 engine on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    engine_path = root / "model.kiln"
    engine.save(engine_path)
    return engine_path


def write_repository(root: Path, engine_path: Path, args: argparse.Namespace) -> Path:
    repository = root / "repository"
    (repository / "resnet50" / "1").mkdir(parents=True)
    shutil.copy(engine_path, repository / "resnet50" / "1" / "model.kiln")
    warmup = "".join(WARMUP.format(batch=b) for b in range(1, MAX_BATCH + 1)) if args.model_warmup else ""
    (repository / "resnet50" / "config.pbtxt").write_text(CONFIG.format(
        max_batch=MAX_BATCH, instances=args.instances, delay_us=args.queue_delay_us,
        kind="KIND_GPU" if args.device == "cuda" else "KIND_CPU",
    ) + warmup)
    return repository


async def _clients(
    url: str, clients: int, start_at: float, stop_at: float, shared_memory: bool, images: int
) -> tuple[list[float], list[str]]:
    import tritonclient.grpc.aio as grpcclient
    import tritonclient.utils.shared_memory as shm

    image = np.random.default_rng(0).standard_normal((images, *IMAGE)).astype(np.float32)
    scores_size = images * 1000 * 4
    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    errors: list[str] = []
    regions = []

    async def one_client() -> None:
        tensor = grpcclient.InferInput("input", list(image.shape), "FP32")
        outputs = None
        if shared_memory:  # the image in a region of this client's own, the scores in another
            tag = uuid.uuid4().hex
            region = shm.create_shared_memory_region(f"in-{tag}", f"/kiln-bench-in-{tag}", image.nbytes)
            scores = shm.create_shared_memory_region(f"out-{tag}", f"/kiln-bench-out-{tag}", scores_size)
            regions.extend([region, scores])
            shm.set_shared_memory_region(region, [image])
            await client.register_system_shared_memory(f"in-{tag}", f"/kiln-bench-in-{tag}", image.nbytes)
            await client.register_system_shared_memory(f"out-{tag}", f"/kiln-bench-out-{tag}", scores_size)
            tensor.set_shared_memory(f"in-{tag}", image.nbytes)
            outputs = [grpcclient.InferRequestedOutput("logits")]
            outputs[0].set_shared_memory(f"out-{tag}", scores_size)
        else:
            tensor.set_data_from_numpy(image)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer("resnet50", [tensor], outputs=outputs)
            except Exception as error:  # counted and reported: the run must see none
                errors.append(repr(error))
                continue
            latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        for region in regions:
            await client.unregister_system_shared_memory(region._triton_shm_name)
            shm.destroy_shared_memory_region(region)
        await client.close()
    return latencies, errors


def _client_process(
    url: str, clients: int, start_at: float, stop_at: float, shared_memory: bool, images: int, results
) -> None:
    results.put(asyncio.run(_clients(url, clients, start_at, stop_at, shared_memory, images)))


def drive(
    url: str, concurrency: int, processes: int, duration_s: float, shared_memory: bool = False,
    images: int = 1,
) -> dict:
    """``concurrency`` clients spread over ``processes`` processes, one request after another, all
    starting together once every process has started (wall-clock times, shared by processes)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    start_at = time.time() + PROCESS_START_S
    workers = [
        context.Process(
            target=_client_process,
            args=(url, share, start_at, start_at + duration_s, shared_memory, images, results),
        )
        for share in shares if share
    ]
    for worker in workers:
        worker.start()
    gathered = [results.get() for _ in workers]
    elapsed = duration_s  # requests still in flight at the end finish late, and are counted
    for worker in workers:
        worker.join()
    latencies = np.array([x for lat, _ in gathered for x in lat])
    errors = [e for _, errs in gathered for e in errs]
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def kiln_bench(engine_path: Path, batch: int, streams: int, duration_s: float) -> float:
    """``kiln bench``'s images/s for ``engine_path`` at ``batch``."""
    command = [
        sys.executable, "-m", "kiln.cli.main", "bench", str(engine_path),
        "--shapes", f"input:{batch}x{'x'.join(map(str, IMAGE))}", "--streams", str(streams),
        "--duration", str(duration_s), "--json",
    ]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return report["throughput_qps"] * batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--client-processes", type=int, default=8, help="client processes (8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up load (5)")
    parser.add_argument("--instances", type=int, default=2, help="GPU instances (2)")
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="batcher delay (2000)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check (cuda)")
    parser.add_argument(
        "--request-batch", type=int, default=1, help=f"images per request, 1 to {MAX_BATCH} (1)"
    )
    parser.add_argument(
        "--shared-memory", choices=("none", "system"), default="none",
        help="where clients put images: in the request (none) or in system shared memory",
    )
    parser.add_argument(
        "--no-model-warmup", dest="model_warmup", action="store_false",
        help="leave model_warmup out of the config (batch sizes are captured under load)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.request_batch <= MAX_BATCH:
        parser.error(f"--request-batch must be from 1 to {MAX_BATCH}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("serve_gpu.py needs a CUDA GPU (or --device cpu)")

    with tempfile.TemporaryDirectory(prefix="kiln-serve-gpu-") as tmp:
        root = Path(tmp)
        engine_path = build_engine(root, args.device)
        server, ports = start_server(write_repository(root, engine_path, args))
        try:
            url = f"127.0.0.1:{ports['grpc']}"
            shared = args.shared_memory == "system"
            drive(url, args.concurrency, args.client_processes, args.warmup, shared, args.request_batch)
            count = lambda metric: scrape(ports["metrics"], metric, "resnet50")  # noqa: E731
            before = {m: count(m) for m in ("nv_inference_count", "nv_inference_exec_count")}
            served = drive(
                url, args.concurrency, args.client_processes, args.duration, shared, args.request_batch
            )
            after = {m: count(m) for m in before}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        images = after["nv_inference_count"] - before["nv_inference_count"]
        executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
        mean_batch = images / max(executions, 1)
        served_ips = len(served["latencies"]) * args.request_batch / served["elapsed"]
        matching = max(1, round(mean_batch))
        bench = {b: kiln_bench(engine_path, b, args.instances, 5.0) for b in sorted({matching, MAX_BATCH})}

    p50, p99 = np.percentile(served["latencies"] * 1e3, [50, 99])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; concurrency {args.concurrency} over "
          f"{args.client_processes} client processes, {args.instances} instances, "
          f"{args.duration:g} s, {args.request_batch} images per request, queue delay {args.queue_delay_us} us, shared memory "
          f"{args.shared_memory}, model_warmup {'every batch size' if args.model_warmup else 'none'}")
    print(f"served: {served_ips:.0f} images/s, {served_ips / args.request_batch:.0f} requests/s, "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"{len(served['errors'])} errors; {images:.0f} images in {executions:.0f} executions "
          f"(mean batch {mean_batch:.1f})")
    for batch, ips in bench.items():
        print(f"kiln bench at batch {batch}, {args.instances} streams: {ips:.0f} images/s; "
              f"served / bench = {served_ips / ips:.2f}")
    for error in served["errors"][:3]:
        print(f"    error: {error}")
    return 0 if not served["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
