"""Prometheus metrics under Triton's names, so dashboards and alerts written for Triton work.

prometheus_client appends ``_total`` to every counter it exposes; Triton's counters have no such
suffix, so the cumulative values are exposed as untyped samples under Triton's exact names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CUMULATIVE = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (a request of batch size n counts n)",
    "nv_inference_exec_count": "Number of model executions performed (one per dynamic batch)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
}


class ModelMetrics:
    """The counters of one model version; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = dict.fromkeys(_CUMULATIVE, 0.0)

    def request_done(self, success: bool, duration_s: float) -> None:
        with self._lock:
            self.values["nv_inference_request_success" if success else "nv_inference_request_failure"] += 1
            self.values["nv_inference_request_duration_us"] += duration_s * 1e6

    def batch_executed(self, batch_sizes: list[int], queue_s: float, compute_s: float) -> None:
        """One execution of ``len(batch_sizes)`` requests that queued ``queue_s`` in total."""
        with self._lock:
            self.values["nv_inference_exec_count"] += 1
            self.values["nv_inference_count"] += sum(batch_sizes)
            self.values["nv_inference_queue_duration_us"] += queue_s * 1e6
            # as in Triton, every request of a batch accounts for the batch's compute time
            self.values["nv_inference_compute_infer_duration_us"] += compute_s * 1e6 * len(batch_sizes)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)


class Metrics:
    """Every model version's counters and the GPU gauges, in a registry of the server's own."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def model(self, name: str, version: int | str) -> ModelMetrics:
        with self._lock:
            return self._models.setdefault((name, str(version)), ModelMetrics())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            models = list(self._models.items())
        snapshots = [(labels, metrics.snapshot()) for labels, metrics in models]
        for name, documentation in _CUMULATIVE.items():
            family = Metric(name, documentation, "unknown")
            for (model, version), values in snapshots:
                family.add_sample(name, {"model": model, "version": version}, values[name])
            yield family
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[Metric]:
    """GPU memory in use and in total per device, only where this process already uses CUDA:
    asking an idle GPU would create a CUDA context just to report on it."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
    total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
    for index in range(torch.cuda.device_count()):
        free, capacity = torch.cuda.mem_get_info(index)
        uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        used.add_metric([uuid], capacity - free)
        total.add_metric([uuid], capacity)
    yield used
    yield total
