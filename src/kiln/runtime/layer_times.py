"""How long an engine's runs take, whole (:func:`run_time`) and layer by layer (:func:`layer_times`).

A whole run is timed as it runs, with CUDA graphs on a GPU: the median of runs on the host's
clock, the device synchronized around each. Layers are timed layer by layer (a :class:`~kiln.runtime.timing.Timeline` with ``layers=True``:
an event after each layer). Taken as they are, the spans would charge a layer for the host's time
whenever its launch costs the host more than its kernels cost the device (a Triton kernel's Python
launch path, around 20 us, against kernels of a few): the device waits for the host between
layers. So each timed run is queued behind a wait on the device (``torch.cuda._sleep``) at least
as long as the host takes to queue the whole run, measured in the warm-up; the layers then run
back to back, as a CUDA graph replays them, and the events measure the device alone. On the CPU
the spans are the host's time, which is the device's there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from kiln.runtime.engine import Engine
from kiln.runtime.timing import COMPUTE, DEVICE_TO_HOST, HOST_TO_DEVICE, Timeline

NOT_LAYERS = (HOST_TO_DEVICE, COMPUTE, DEVICE_TO_HOST)
CLOCK_HZ_BOUND = 2.5e9  # above any GPU's clock: a wait of n cycles lasts at least n / this seconds
QUEUE_MARGIN = 2.0  # the wait lasts this many times the host's time to queue a run
WARMUP_RUNS, MIN_RUNS, MAX_RUNS, MIN_SECONDS = 3, 10, 200, 0.3


def run_time(engine: Engine, feed: Mapping[str, Any]) -> float:
    """The median time of a run of ``engine`` on ``feed`` (seconds), over at least
    :data:`MIN_RUNS` runs and :data:`MIN_SECONDS`, at most :data:`MAX_RUNS` runs."""
    synchronize = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(WARMUP_RUNS):
        engine.run(feed)
    times: list[float] = []
    while len(times) < MIN_RUNS or (sum(times) < MIN_SECONDS and len(times) < MAX_RUNS):
        synchronize()
        start = time.perf_counter()
        engine.run(feed)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_times(engine: Engine, feed: Mapping[str, Any], iterations: int, warmup: int) -> list[float]:
    """The median device time of each of ``engine``'s layers (seconds, in execution order) over
    ``iterations`` runs on ``feed``, after ``warmup`` untimed runs (at least one)."""
    cuda = engine.device.type == "cuda"
    host_seconds = 0.0
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        engine.run(feed, Timeline(engine.device, layers=True))
        host_seconds = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize(engine.device)
    timeline = Timeline(engine.device, layers=True)
    for _ in range(max(iterations, 1)):
        if cuda:
            # private but long-standing: the one way to hold the stream without the host
            torch.cuda._sleep(int(host_seconds * QUEUE_MARGIN * CLOCK_HZ_BOUND))
        engine.run(feed, timeline)
        if cuda:
            torch.cuda.synchronize(engine.device)
    runs = [[span.seconds for span in run if span.label not in NOT_LAYERS] for run in timeline.runs()]
    return [statistics.median(times) for times in zip(*runs)]
