"""How close one run's outputs are to a reference's: tolerance checks and accuracy reports.

:func:`agreement` compares two arrays (``kiln compare``); :func:`accuracy_report` compares an
engine with a reference (FP32 in ONNX Runtime, or any callable) over many batches, as reduced
precision builds report their accuracy (design §4).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.errors import InputError, ModelError

Infer = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class Agreement:
    """How far ``actual`` is from ``expected``, and whether it is within tolerance.

    Within tolerance means ``|actual - expected| <= atol + rtol * |expected|`` everywhere, with
    NaNs in the same places counting as equal. ``max_rel`` is over elements where expected is
    not 0; ``cosine`` is over elements finite on both sides, and 1 for two all-zero arrays.
    """

    passed: bool
    max_abs: float
    max_rel: float
    cosine: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value != ""}


def agreement(actual: Any, expected: Any, atol: float, rtol: float) -> Agreement:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        note = f"shape {list(actual.shape)} vs {list(expected.shape)}"
        return Agreement(False, float("inf"), float("inf"), 0.0, note)
    if actual.dtype.kind not in "biufc" or expected.dtype.kind not in "biufc":
        equal = bool(np.array_equal(actual, expected))
        return Agreement(equal, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                         1.0 if equal else 0.0, "compared for equality")
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    same = (a == e) | (np.isnan(a) & np.isnan(e))  # equal infinities too
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - e))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is maximally wrong
    passed = bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(e))))
    nonzero = e != 0
    max_rel = float((diff[nonzero] / np.abs(e[nonzero])).max()) if nonzero.any() else (
        0.0 if not diff.any() else float("inf")
    )
    return Agreement(passed, float(diff.max()) if diff.size else 0.0, max_rel, _cosine(a, e))


def _cosine(a: np.ndarray, e: np.ndarray) -> float:
    finite = np.isfinite(a) & np.isfinite(e)
    a, e = a[finite], e[finite]
    norms = float(np.linalg.norm(a) * np.linalg.norm(e))
    if norms == 0:
        return 1.0 if not a.any() and not e.any() else 0.0
    return float(np.dot(a, e) / norms)


@dataclass(frozen=True)
class OutputAccuracy:
    """One output over every batch: the largest absolute and relative errors, the cosine
    similarity of the whole and of the worst sample (along the first axis), and for outputs
    shaped like class scores ([batch, classes]) the share of samples whose top-1 class agrees."""

    name: str
    samples: int
    max_abs: float
    max_rel: float
    cosine: float
    worst_sample_cosine: float
    top1_agreement: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_report(
    run: Infer, reference: Infer, batches: Iterable[Mapping[str, Any]], outputs: list[str]
) -> list[OutputAccuracy]:
    """Run ``run`` and ``reference`` on every batch and compare their ``outputs``."""
    ours: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    theirs: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for batch in batches:
        feed = {name: np.asarray(array) for name, array in batch.items()}
        got, expected = run(feed), reference(feed)
        for name in outputs:
            ours[name].append(_numpy(got[name]))
            theirs[name].append(_numpy(expected[name]))
    return [_output_accuracy(name, ours[name], theirs[name]) for name in outputs]


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float64)


def _output_accuracy(name: str, ours: list[np.ndarray], theirs: list[np.ndarray]) -> OutputAccuracy:
    rows = [(a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)) for a in ours]
    rows_ref = [(e.reshape(e.shape[0], -1) if e.ndim else e.reshape(1, 1)) for e in theirs]
    a, e = np.concatenate(rows), np.concatenate(rows_ref)
    stats = agreement(a, e, atol=0.0, rtol=0.0)
    per_sample = [_cosine(x, y) for x, y in zip(a, e)]
    top1 = None
    if all(o.ndim == 2 and o.shape[1] > 1 for o in ours):
        top1 = float(np.mean(a.argmax(axis=1) == e.argmax(axis=1)))
    return OutputAccuracy(
        name, a.shape[0], stats.max_abs, stats.max_rel, stats.cosine,
        float(min(per_sample)) if per_sample else 1.0, top1,
    )


def onnxruntime_reference(model: str | os.PathLike | bytes) -> Infer:
    """Runs the ONNX model ``model`` (a path or its bytes) in ONNX Runtime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("the FP32 reference runs in ONNX Runtime: pip install onnxruntime") from None
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own unrelated exception types
        raise ModelError(f"ONNX Runtime cannot load the reference: {error}".splitlines()[0]) from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(feed: Mapping[str, Any]) -> dict[str, Any]:
        return dict(zip(outputs, session.run(None, {name: feed[name] for name in inputs})))

    return run
