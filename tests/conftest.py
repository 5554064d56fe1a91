"""Shared test set-up: GPU tests skip without a GPU; the node-suite pass count is printed, and
a full node-suite run with fewer than the required passes fails the session. Exported models
shared by tests in several folders are exported once per session."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from filelock import FileLock

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when
# it is first imported (its own library functions are defined then), so it is set before anything
# imports it; with a GPU the compiled kernels run and the interpreter's tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.models import minilm, zoo

CONFORMANCE = "tests/conformance/test_onnx_node_suite.py"
REQUIRED_PASSES = 1600
_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreter = pytest.mark.skip(reason="Triton's interpreter is off (the GPU runs Triton)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "triton_interpreter" in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)


def pytest_runtest_logreport(report):
    expected_failure = report.skipped and hasattr(report, "wasxfail")
    if CONFORMANCE not in report.nodeid or (report.skipped and not expected_failure):
        return  # skipped cases (a device this machine lacks) did not run
    if report.when == "call" or (report.when == "setup" and report.failed):
        device = "cuda" if report.nodeid.endswith("_cuda") else "cpu"
        _outcomes[device]["xfailed" if expected_failure else report.outcome] += 1


def _below_requirement(count: collections.Counter) -> bool:
    return sum(count.values()) >= REQUIRED_PASSES and count["passed"] < REQUIRED_PASSES


def pytest_sessionfinish(session, exitstatus):
    if any(_below_requirement(count) for count in _outcomes.values()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for device, count in sorted(_outcomes.items()):
        terminalreporter.write_sep(
            "=",
            f"ONNX node conformance ({device}): {count['passed']} passed of "
            f"{sum(count.values())} run ({count['xfailed']} expected failures, "
            f"{count['failed']} failed)",
        )
        if _below_requirement(count):
            terminalreporter.write_line(f"conformance below the required {REQUIRED_PASSES} passes", red=True)


@pytest.fixture(scope="session")
def resnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.ResNet()
    zoo.randomize_batchnorm(model)
    return zoo.export(model, (torch.randn(2, 3, 64, 64),), tmp_path_factory.mktemp("resnet") / "resnet.onnx",
                      ["image"], {"image": {0: "batch", 2: "height", 3: "width"}})


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.BertEncoder()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    return zoo.export(model, (ids, mask), tmp_path_factory.mktemp("bert") / "bert.onnx",
                      ["input_ids", "attention_mask"],
                      {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory):
    """all-MiniLM-L6-v2 with its real weights (symbolic batch, 64 tokens), exported once per run:
    under pytest-xdist the workers share one export through a lock in the run's temporary folder."""
    if reason := minilm.unavailable():
        pytest.skip(reason)
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return minilm.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    folder = tmp_path_factory.getbasetemp().parent / "minilm"  # shared by this run's workers
    folder.mkdir(exist_ok=True)
    path = folder / "minilm.onnx"
    with FileLock(str(folder / "export.lock")):
        if not path.exists():
            minilm.export_minilm(folder / "partial.onnx").rename(path)
    return path
