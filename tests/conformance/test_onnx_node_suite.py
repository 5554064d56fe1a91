"""The ONNX backend node suite (the ``onnx.backend.test`` node cases) run through kiln.

Cases kiln does not pass are listed with their reasons in ``expected_failures.txt``; they run as
strict expected failures, so one that starts passing must be taken off the list.
"""

from __future__ import annotations

import re
import unittest
from pathlib import Path

import onnx.backend.test

from tests.conformance.backend import KilnBackend

EXPECTED_FAILURES = Path(__file__).with_name("expected_failures.txt")


def _expected_failures() -> dict[str, str]:
    reasons = {}
    for line in EXPECTED_FAILURES.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            reasons[name.strip()] = reason.strip()
    return reasons


def _node_cases() -> type:
    suite = onnx.backend.test.BackendTest(KilnBackend, __name__)
    cases = suite.test_cases["OnnxBackendNodeModelTest"]
    failures = _expected_failures()
    for attr in dir(cases):
        base = re.sub(r"_(cpu|cuda)$", "", attr)
        if attr.startswith("test_") and (attr in failures or base in failures):
            setattr(cases, attr, unittest.expectedFailure(getattr(cases, attr)))
    return cases


OnnxBackendNodeModelTest = _node_cases()
