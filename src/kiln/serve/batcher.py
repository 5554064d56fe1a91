"""Dynamic batching: one queue per model version, drained by one worker thread per instance.

A worker takes the oldest request and the queued requests that can share its batch (same
dtypes and same non-batch dimensions: nothing is padded), up to ``max_batch_size``. It runs them
at once when they fill the batch or make up a preferred batch size, and otherwise waits for more
until the oldest has queued ``max_queue_delay``. The inputs are concatenated along the batch
dimension and the outputs split back per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tritonclient.grpc import model_config_pb2

from kiln.errors import InputError
from kiln.runtime import Engine
from kiln.runtime.graphs import DEFAULT_GRAPH_CAPACITY
from kiln.serve.metrics import ModelMetrics
from kiln.serve.protocol import InternalError, InvalidRequest, Unavailable
from kiln.serve.warmup import WarmupSample

log = logging.getLogger("kiln.serve.batcher")


@dataclass(frozen=True)
class BatchingPolicy:
    """The scheduling part of a model config, in seconds."""

    max_batch_size: int = 0  # 0: the model has no batch dimension; requests run one by one
    dynamic: bool = False
    preferred_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 0  # 0: unbounded
    default_timeout_s: float | None = None
    allow_timeout_override: bool = True
    reject_on_timeout: bool = True

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig) -> BatchingPolicy:
        if not config.HasField("dynamic_batching"):
            return cls(max_batch_size=config.max_batch_size)
        batching = config.dynamic_batching
        queue = batching.default_queue_policy
        return cls(
            max_batch_size=config.max_batch_size,
            dynamic=config.max_batch_size > 0,
            preferred_sizes=tuple(sorted(set(batching.preferred_batch_size))),
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            max_queue_size=queue.max_queue_size,
            default_timeout_s=queue.default_timeout_microseconds / 1e6 or None,
            allow_timeout_override=queue.allow_timeout_override or not queue.default_timeout_microseconds,
            reject_on_timeout=queue.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT,
        )

    def timeout_s(self, requested_us: int | None) -> float | None:
        """A request's time limit in the queue: its own may shorten the default, never extend it."""
        if requested_us is None or not self.allow_timeout_override:
            return self.default_timeout_s
        requested = requested_us / 1e6 if requested_us > 0 else None
        if self.default_timeout_s is None or requested is None:
            return requested or self.default_timeout_s
        return min(requested, self.default_timeout_s)


class Instance:
    """An execution context: an Engine of its own and, on CUDA, a stream of its own, so that
    instances of one model overlap on the GPU. ``graph_capacity``: how many input shapes keep
    their CUDA graph (every warmed-up shape should)."""

    def __init__(self, engine: Engine, graph_capacity: int = DEFAULT_GRAPH_CAPACITY) -> None:
        self.engine = engine
        self._context = engine.create_context(graph_capacity=graph_capacity)
        self._stream = torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None
        self._page_locked: dict[str, torch.Tensor] = {}  # per input: where batches are gathered

    @property
    def captured_signatures(self) -> int:
        return self._context.captured_signatures

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # NumPy out: the copy to the host waits for the stream
        return self._context.run(inputs, stream=self._stream)

    def run_batch(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Run several requests' inputs as one batch, concatenated along the first dimension."""
        if self._stream is None:
            return self.run(parts[0] if len(parts) == 1 else {
                name: np.concatenate([part[name] for part in parts]) for name in parts[0]
            })
        return self.run({name: self._gather(name, [part[name] for part in parts]) for name in parts[0]})

    def _gather(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """On a GPU, the batch goes into page-locked memory: the device reads it directly, where
        pageable memory would cost the driver a second copy. The run copies it to the device
        before it returns, so the memory is free for the next batch."""
        first = arrays[0]
        if first.dtype.hasobject:  # strings stay on the host
            return first if len(arrays) == 1 else np.concatenate(arrays)
        shape = first.shape if len(arrays) == 1 else (sum(len(a) for a in arrays), *first.shape[1:])
        size = math.prod(shape) * first.dtype.itemsize
        buffer = self._page_locked.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._page_locked[name] = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=True)
        gathered = buffer.numpy()[:size].view(first.dtype).reshape(shape)
        if len(arrays) == 1:
            np.copyto(gathered, first)
        else:
            np.concatenate(arrays, out=gathered)
        return gathered

    def warm_up(self, samples: list[WarmupSample]) -> None:
        """Run each sample ``count`` times, and on a GPU at least twice: its CUDA graph is then
        captured before the first request."""
        for sample in samples:
            runs = max(sample.count, 2) if self._stream is not None else sample.count
            for _ in range(runs):
                self.run(sample.inputs)


@dataclass(eq=False)
class _Job:
    inputs: dict[str, np.ndarray]
    batch_size: int
    group: Hashable  # jobs of one group can share a batch
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(
        self, label: str, instances: list[Instance], policy: BatchingPolicy, metrics: ModelMetrics
    ) -> None:
        self.label = label
        self.instances = instances
        self.policy = policy
        self._metrics = metrics
        self._queue: list[_Job] = []
        self._closed = False
        self._ready = threading.Condition()
        self._workers = [
            threading.Thread(
                target=self._work, args=(instance,), name=f"kiln-serve {label} #{i}", daemon=True
            )
            for i, instance in enumerate(instances)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, inputs: dict[str, np.ndarray], timeout_us: int | None = None) -> Future:
        """Queue one request (inputs already checked against the model); its future gets the
        outputs by name, or a RequestError."""
        batched = self.policy.max_batch_size > 0
        batch_size = next(iter(inputs.values())).shape[0] if batched and inputs else 1
        group = tuple(
            (name, array.dtype.str, array.shape[1:] if batched else array.shape)
            for name, array in sorted(inputs.items())
        )
        timeout = self.policy.timeout_s(timeout_us)
        job = _Job(inputs, batch_size, group, None)
        job.deadline = None if timeout is None else job.enqueued + timeout
        with self._ready:
            if self._closed:
                raise Unavailable(f"model {self.label} is unloading")
            if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
                raise Unavailable(
                    f"model {self.label}: the queue is full ({self.policy.max_queue_size} requests)"
                )
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def pending(self) -> int:
        with self._ready:
            return len(self._queue)

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, run the queued ones, and stop the workers."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _work(self, instance: Instance) -> None:
        # OpenMP keeps its thread count per calling thread: without this, a worker computes with
        # every core whatever torch.set_num_threads said, and instances oversubscribe the CPU.
        torch.set_num_threads(torch.get_num_threads())
        while (jobs := self._next_batch()) is not None:
            self._execute(instance, jobs)

    def _next_batch(self) -> list[_Job] | None:
        with self._ready:
            while True:
                now = time.perf_counter()
                self._reject_expired(now)
                if not self._queue:
                    if self._closed:
                        return None
                    self._ready.wait()
                    continue
                jobs, wait_s = self._form_batch(now)
                if jobs:
                    taken = set(map(id, jobs))
                    self._queue = [job for job in self._queue if id(job) not in taken]
                    # a request whose client went away was cancelled: skip it
                    runnable = [job for job in jobs if job.future.set_running_or_notify_cancel()]
                    if runnable:
                        return runnable
                    continue
                deadlines = [job.deadline - now for job in self._queue if job.deadline is not None]
                self._ready.wait(min([wait_s, *deadlines]))

    def _form_batch(self, now: float) -> tuple[list[_Job], float]:
        """The jobs to run now, or none and how long to wait for more."""
        head = self._queue[0]
        if not self.policy.dynamic:
            return [head], 0.0
        jobs, sizes, total, full = [], [], 0, False
        for job in self._queue:
            if job.group != head.group:
                continue
            if total + job.batch_size > self.policy.max_batch_size:
                full = True
                break
            jobs.append(job)
            total += job.batch_size
            sizes.append(total)
        if full or total == self.policy.max_batch_size or self._closed:
            return jobs, 0.0
        for count in range(len(jobs), 0, -1):
            if sizes[count - 1] in self.policy.preferred_sizes:
                return jobs[:count], 0.0
        waited = now - head.enqueued
        if waited >= self.policy.max_queue_delay_s:
            return jobs, 0.0
        return [], self.policy.max_queue_delay_s - waited

    def _reject_expired(self, now: float) -> None:
        if not self.policy.reject_on_timeout:
            return
        expired = [job for job in self._queue if job.deadline is not None and job.deadline <= now]
        if not expired:
            return
        self._queue = [job for job in self._queue if job not in expired]
        for job in expired:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    Unavailable(f"model {self.label}: the request timed out in the queue")
                )

    def _execute(self, instance: Instance, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            compute_started = time.perf_counter()
            outputs = instance.run_batch([job.inputs for job in jobs])
            compute_s = time.perf_counter() - compute_started
            results = self._split(outputs, jobs)
        except InputError as error:
            if len(jobs) > 1:  # one request's fault: run each alone so the others succeed
                for job in jobs:
                    self._execute(instance, [job])
                return
            jobs[0].future.set_exception(InvalidRequest(str(error)))
            return
        except Exception:
            log.exception("model %s failed on a batch of %d requests", self.label, len(jobs))
            for job in jobs:
                job.future.set_exception(InternalError())
            return
        self._metrics.batch_executed(
            [job.batch_size for job in jobs], sum(started - job.enqueued for job in jobs), compute_s
        )
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _split(self, outputs: dict[str, Any], jobs: list[_Job]) -> list[dict[str, Any]]:
        if len(jobs) == 1:
            return [outputs]
        total = sum(job.batch_size for job in jobs)
        for name, value in outputs.items():
            if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != total:
                raise RuntimeError(f"output {name!r} does not have the batch dimension first")
        results, offset = [], 0
        for job in jobs:
            end = offset + job.batch_size
            results.append({name: value[offset:end] for name, value in outputs.items()})
            offset = end
        return results
