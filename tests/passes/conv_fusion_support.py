"""Shared by the BatchNorm-folding, activation and conv-fusion tests: build small graphs, run passes
in the pipeline's order, and compare the result with ONNX Runtime on the original model."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript.optimizer import fold_constants

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.base import GraphPass, PassOutcome
from kiln.passes.rewrite import SOURCES_KEY

MAX_RELATIVE_ERROR = 1e-4


def graph_model(nodes: list[onnx.NodeProto], inputs: dict[str, list], outputs: dict[str, list | None],
                initializers: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A float32 model of ``nodes``; ``inputs``/``outputs`` map names to shapes (an output's None:
    inferred). Intermediate shapes are inferred too, as kiln's pipeline does before fusing."""
    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes, "test",
        [info(n, s) for n, s in inputs.items()],
        [info(n, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def export_torch(module: torch.nn.Module, example: tuple, dynamic: dict[int, str],
                 optimize: bool, output_names: list[str] | None = None) -> onnx.ModelProto:
    """``module`` exported by torch, with one input ``x`` of ``dynamic`` dimensions."""
    module.eval()
    shapes = ({axis: torch.export.Dim(name, min=2, max=256) for axis, name in dynamic.items()},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, dynamo=True, input_names=["x"], output_names=output_names,
            dynamic_shapes=shapes, optimize=optimize, verbose=False,
        )
    return program.model_proto


class FoldConstants(GraphPass):
    """Constant folding, standing in for kiln's simplification level that runs before fusion
    (an unoptimized export computes Conv biases and Clip bounds from constants)."""

    def __call__(self, model: ir.Model) -> PassOutcome:
        fold_constants(model)
        return PassOutcome(model)


def run_passes(proto: onnx.ModelProto, *passes: GraphPass) -> tuple[ir.Model, Counter]:
    """``passes`` applied in order to a copy of ``proto``; their changes added up."""
    model, changes = load_onnx(proto.SerializeToString()), Counter()
    for graph_pass in passes:
        outcome = graph_pass(model)
        model, changes = outcome.model, changes + outcome.changes
    return model, changes


def op_types(model: ir.Model) -> Counter:
    """How many nodes of each op type (``kiln::Op`` for kiln's domain), Constants left out."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type
                   for n in model.graph if n.op_type != "Constant")


def kiln_nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == "kiln" and n.op_type == op_type]


def sources(node: ir.Node) -> list[str]:
    return json.loads(node.metadata_props[SOURCES_KEY])


def assert_matches_onnxruntime(original: onnx.ModelProto, optimized: ir.Model,
                               shapes: list[dict[str, tuple[int, ...]]], seed: int = 0) -> None:
    """The optimized model, run by kiln, gives ONNX Runtime's outputs of the original at every
    set of input ``shapes`` (fresh random inputs, never zero)."""
    engine = kiln.build(ir.serde.serialize_model(optimized), device="cpu", opt_level=0)
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for feed_shapes in shapes:
        feeds = {name: rng.uniform(0.1, 3.0, shape).astype(np.float32) * rng.choice([-1, 1], shape)
                 .astype(np.float32) for name, shape in feed_shapes.items()}
        expected = session.run(None, feeds)
        actual = engine.run(feeds)
        for (name, value), reference in zip(actual.items(), expected, strict=True):
            assert value.shape == reference.shape, name
            scale = max(float(np.abs(reference).max()), 1e-30)
            error = float(np.abs(value.astype(np.float64) - reference).max()) / scale
            assert error <= MAX_RELATIVE_ERROR, f"{name} at {feed_shapes}: relative error {error:.2e}"
