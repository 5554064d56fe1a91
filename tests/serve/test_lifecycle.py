"""``kiln serve`` as a process: SIGTERM finishes accepted requests, refuses new ones and exits;
start-up mistakes print one line and exit 1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from kiln.cli.main import main
from tests.serve.conftest import random_x, write_model

# Requests wait up to 1.5 s in the queue for company: long enough to signal with one in flight.
SLOW_CONFIG = """
max_batch_size: 8
instance_group [ { kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 1500000 }
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, path: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def infer_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_finishes_accepted_requests_and_refuses_new_ones(tmp_path, engines, signum):
    write_model(tmp_path, "slow", engines["mlp"], SLOW_CONFIG)
    http, grpc, metrics = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "serve", str(tmp_path), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        x = random_x(2)
        accepted: list = []
        in_flight = threading.Thread(
            target=lambda: accepted.append(post(http, "/v2/models/slow/infer", infer_body(x)))
        )
        in_flight.start()
        time.sleep(0.5)  # the request now waits in the queue
        signalled = time.monotonic()
        server.send_signal(signum)
        time.sleep(0.2)
        status, refused = post(http, "/v2/models/slow/infer", infer_body(x))
        assert status == 503 and "shutting down" in refused["error"]
        in_flight.join(30)
        status, result = accepted[0]
        assert status == 200
        np.testing.assert_allclose(
            np.array(result["outputs"][0]["data"]).reshape(2, 4), engines["mlp"].run({"x": x})["y"], rtol=1e-6
        )
        assert server.wait(30) == 0
        assert time.monotonic() - signalled < 30
        assert "slow" in server.stdout.read()  # the start-up table
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_missing_repository_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a directory" in error


def test_a_taken_port_is_one_line_and_exit_1(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", str(tmp_path), "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0"]
        assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in error


@pytest.mark.parametrize(
    "flag, value", [("--http-port", "70000"), ("--cpu-threads", "0"), ("--max-request-bytes", "5")]
)
def test_bad_options_are_usage_errors(tmp_path, flag, value):
    with pytest.raises(SystemExit) as raised:
        main(["serve", str(tmp_path), flag, value])
    assert raised.value.code == 2
