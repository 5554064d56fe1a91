"""Helpers of the MatMul and norm fusion tests: export from torch, run a pass, compare with ORT."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.passes import common

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.base import GraphPass
from tests.models import zoo


def export(module: torch.nn.Module, example: tuple, names: list[str],
           dynamic: dict[str, dict[int, str]], optimize: bool) -> onnx.ModelProto:
    """``module`` through torch's dynamo exporter, dimensions named in ``dynamic`` left dynamic."""
    return zoo.export_proto(module, example, names, dynamic, optimize, dim_range=(2, 64))


def apply(rewrite_pass: GraphPass, proto: onnx.ModelProto) -> tuple[ir.Model, Counter]:
    """The model after ``rewrite_pass`` and the dead-code removal the pipeline runs after it."""
    outcome = rewrite_pass(load_onnx(proto))
    return common.RemoveUnusedNodesPass()(outcome.model).model, outcome.changes


def ops(model: ir.Model) -> list[str]:
    """The model's node types in graph order, kiln's as ``kiln::Op``, Constants left out."""
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type
            for n in model.graph if n.op_type != "Constant"]


def node(model: ir.Model, op_type: str) -> ir.Node:
    (found,) = [n for n in model.graph if n.op_type == op_type]
    return found


def attributes(n: ir.Node) -> dict:
    return {k: a.value for k, a in n.attributes.items()}


def random_inputs(proto: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict[str, Any]:
    """Fresh inputs (never zeros) for the graph's inputs, symbolic dims sized from ``sizes``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in tensor.shape.dim]
        magnitude = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        inputs[value.name] = magnitude.astype(dtype)
    return inputs


def max_relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference relative to the largest magnitude of ``expected``."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_matches_ort(fused: ir.Model, reference: onnx.ModelProto, sizes: Sequence[dict[str, int]],
                       tolerance: float = 1e-4) -> None:
    """``fused``, built by kiln without further passes, against ORT on ``reference`` (the model
    before the pass, or an ONNX-only equivalent), at each set of dimension sizes."""
    engine = kiln.build(ir.serde.serialize_model(fused), device="cpu", opt_level=0)
    session = ort.InferenceSession(reference.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.graph.output]
    for seed, dims in enumerate(sizes):
        inputs = random_inputs(reference, dims, seed)
        got = engine.run(inputs)
        for name, expected in zip(names, session.run(names, inputs)):
            assert got[name].shape == expected.shape, name
            error = max_relative_error(got[name], expected)
            assert error <= tolerance, f"{name} at {dims}: relative error {error:.2e}"
