"""Shared test set-up: GPU tests skip without a GPU; the node-suite pass count is printed."""

from __future__ import annotations

import collections

import pytest
import torch

CONFORMANCE = "tests/conformance/test_onnx_node_suite.py"
NODE_CASES = 1884  # _cpu (or _cuda) node cases of the onnx package this suite was written for
REQUIRED_PASSES = 1600


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in ("passed", "failed", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if CONFORMANCE in nodeid and report.when in ("call", "setup"):
                device = "cuda" if nodeid.endswith("_cuda") else "cpu"
                if outcome != "skipped":
                    counts[device][outcome] += 1
    for device, count in sorted(counts.items()):
        ran = sum(count.values())
        line = (
            f"ONNX node conformance ({device}): {count['passed']} passed of {ran} run "
            f"({count['xfailed']} expected failures, {count['failed']} failed)"
        )
        terminalreporter.write_sep("=", line)
        if ran >= NODE_CASES and count["passed"] < REQUIRED_PASSES:
            terminalreporter.write_line(
                f"conformance below the required {REQUIRED_PASSES} passes", red=True
            )
            terminalreporter._session.exitstatus = 1
