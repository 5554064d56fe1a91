"""The dynamic batcher on its own: what shares a batch, preferred sizes, queue delay, a full
queue, timeouts, splitting results back, and failures that stay with their request."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2

import kiln
from kiln.errors import InputError
from kiln.serve.batcher import Batcher, BatchingPolicy, Instance
from kiln.serve.metrics import ModelMetrics
from kiln.serve.protocol import InternalError, InvalidRequest, Unavailable
from tests.graphs import mlp


class Recorder:
    """An instance that doubles its input, remembers batch sizes, and can be held."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def run_batch(self, parts):
        self.started.set()
        self.release.wait(10)
        x = np.concatenate([part["x"] for part in parts])
        if (x < 0).any():
            raise InputError("negative values")
        if (x > 1000).any():
            raise RuntimeError("boom")
        self.batches.append(x.shape[0])
        return {"y": x * 2}


def make(policy: BatchingPolicy, instances: int = 1):
    recorders = [Recorder() for _ in range(instances)]
    metrics = ModelMetrics()
    return Batcher("test/1", recorders, policy, metrics), recorders, metrics


def rows(n: int, width: int = 2, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, np.float32)}


def hold_then_submit(batcher, recorder, requests):
    """Occupy the instance, queue ``requests`` behind it, then let everything run."""
    recorder.release.clear()
    blocker = batcher.submit(rows(1))
    recorder.started.wait(5)
    futures = [batcher.submit(r) for r in requests]
    recorder.release.set()
    blocker.result(5)
    return [f.result(5) for f in futures]


def test_queued_requests_share_a_batch_and_get_their_own_rows_back():
    batcher, (recorder,), metrics = make(BatchingPolicy(max_batch_size=8, dynamic=True))
    requests = [{"x": np.full((n, 2), i, np.float32)} for i, n in enumerate([1, 2, 3])]
    results = hold_then_submit(batcher, recorder, requests)
    batcher.close()
    assert recorder.batches == [1, 6]
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result["y"], request["x"] * 2)
    assert metrics.values["nv_inference_exec_count"] == 2 and metrics.values["nv_inference_count"] == 7


def test_different_non_batch_shapes_go_in_different_batches():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True))
    results = hold_then_submit(batcher, recorder, [rows(1, 2), rows(1, 3), rows(2, 2), rows(1, 3)])
    batcher.close()
    assert sorted(recorder.batches[1:]) == [2, 3]
    assert [r["y"].shape for r in results] == [(1, 2), (1, 3), (2, 2), (1, 3)]


def test_max_batch_size_and_preferred_sizes_cut_batches():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=4, dynamic=True))
    hold_then_submit(batcher, recorder, [rows(1) for _ in range(6)])
    batcher.close()
    assert recorder.batches[1:] == [4, 2]

    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True, preferred_sizes=(2,)))
    hold_then_submit(batcher, recorder, [rows(1) for _ in range(5)])
    batcher.close()
    assert recorder.batches[1:] == [2, 2, 1]


def test_the_queue_delay_waits_for_more_requests():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True, max_queue_delay_s=0.3))
    first = batcher.submit(rows(1))
    time.sleep(0.05)
    second = batcher.submit(rows(1))
    first.result(5), second.result(5)
    batcher.close()
    assert recorder.batches == [2]


def test_without_dynamic_batching_each_request_runs_alone():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8))
    hold_then_submit(batcher, recorder, [rows(1), rows(2)])
    batcher.close()
    assert recorder.batches == [1, 1, 2]


def test_a_full_queue_refuses_and_a_timeout_expires():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True, max_queue_size=1))
    recorder.release.clear()
    blocker = batcher.submit(rows(1))
    recorder.started.wait(5)
    queued = batcher.submit(rows(1), timeout_us=50_000)
    with pytest.raises(Unavailable, match="queue is full"):
        batcher.submit(rows(1))
    time.sleep(0.1)
    recorder.release.set()
    blocker.result(5)
    with pytest.raises(Unavailable, match="timed out"):
        queued.result(5)
    batcher.close()
    with pytest.raises(Unavailable, match="unloading"):
        batcher.submit(rows(1))


def test_one_bad_request_fails_alone_and_internal_errors_stay_internal():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True))
    recorder.release.clear()
    blocker = batcher.submit(rows(1))
    recorder.started.wait(5)
    good, bad = batcher.submit(rows(1)), batcher.submit(rows(1, value=-1))
    recorder.release.set()
    blocker.result(5)
    assert good.result(5)["y"].shape == (1, 2)
    with pytest.raises(InvalidRequest, match="negative"):
        bad.result(5)
    with pytest.raises(InternalError) as raised:
        batcher.submit(rows(1, value=5000)).result(5)
    assert "boom" not in str(raised.value)
    batcher.close()


def test_close_runs_what_was_queued():
    batcher, (recorder,), _ = make(BatchingPolicy(max_batch_size=8, dynamic=True, max_queue_delay_s=30))
    pending = batcher.submit(rows(1))
    batcher.close()
    assert pending.result(0)["y"].shape == (1, 2)


def test_several_instances_run_batches_in_parallel():
    batcher, recorders, _ = make(BatchingPolicy(max_batch_size=1, dynamic=True), instances=2)
    for recorder in recorders:
        recorder.release.clear()
    futures = [batcher.submit(rows(1)) for _ in range(2)]
    assert all(r.started.wait(5) for r in recorders)  # both busy at once
    for recorder in recorders:
        recorder.release.set()
    [f.result(5) for f in futures]
    batcher.close()


def test_policy_from_config():
    config = model_config_pb2.ModelConfig(max_batch_size=16)
    config.dynamic_batching.preferred_batch_size.extend([8, 4])
    config.dynamic_batching.max_queue_delay_microseconds = 500
    config.dynamic_batching.default_queue_policy.max_queue_size = 10
    config.dynamic_batching.default_queue_policy.default_timeout_microseconds = 2_000_000
    policy = BatchingPolicy.from_config(config)
    assert policy.dynamic and policy.preferred_sizes == (4, 8) and policy.max_queue_delay_s == 0.0005
    assert policy.max_queue_size == 10
    assert policy.timeout_s(None) == 2.0 and policy.timeout_s(1_000_000) == 2.0  # no override allowed
    config.dynamic_batching.default_queue_policy.allow_timeout_override = True
    policy = BatchingPolicy.from_config(config)
    assert policy.timeout_s(1_000_000) == 1.0 and policy.timeout_s(9_000_000) == 2.0
    assert BatchingPolicy.from_config(model_config_pb2.ModelConfig(max_batch_size=4)).timeout_s(300) == 0.0003


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_instance_on_a_gpu_gathers_batches_in_page_locked_memory():
    engine = kiln.build(mlp(), device="cuda")
    instance = Instance(engine)
    rng = np.random.default_rng(5)
    for sizes in ([3, 1, 4], [2], [5, 5]):  # the gathering memory grows and is reused
        parts = [{"x": rng.standard_normal((n, 4)).astype(np.float32)} for n in sizes]
        got = instance.run_batch(parts)
        expected = engine.run({"x": np.concatenate([part["x"] for part in parts])})
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-3, atol=1e-3)
