"""Helpers of the simplification and shape-inference tests: build graphs, run a pass, compare."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.frontend.onnx import load_onnx
from kiln.passes.base import GraphPass
from tests.models import zoo
from kiln.passes.shapes import parse_dim

MAX_RELATIVE_ERROR = 1e-4
FLOAT = TensorProto.FLOAT


def model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list]], outputs: list[str],
          initializers: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A checked model; inputs as (name, element type, shape), outputs by name (types inferred)."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [numpy_helper.from_array(array, name) for name, array in (initializers or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # Output types from ONNX's inference; their dims, and inner shapes, left unknown.
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type for v in inferred.graph.value_info}
    for output in proto.graph.output:
        output.type.CopyFrom(types[output.name])
    proto = without_inner_shapes(proto)
    onnx.checker.check_model(proto)
    return proto


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array)))


def ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def apply(graph_pass: GraphPass, proto: onnx.ModelProto) -> tuple[ir.Model, Counter]:
    outcome = graph_pass(load_onnx(proto))
    return outcome.model, outcome.changes


def ops(ir_model: ir.Model) -> list[str]:
    """Node types in graph order."""
    return [n.op_type for n in ir_model.graph]


def random_inputs(proto: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Fresh inputs (never zeros) for the graph's inputs, symbolic dims sized from ``sizes``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        shape = [sizes[d.dim_param] if d.dim_param else d.dim_value for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.integer):
            inputs[value.name] = rng.integers(1, 5, shape).astype(dtype)
        else:
            magnitude = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
            inputs[value.name] = magnitude.astype(dtype)
    return inputs


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_matches_onnxruntime(original: onnx.ModelProto, optimized: ir.Model,
                               sizes: Sequence[dict[str, int]], inputs=random_inputs) -> None:
    """The optimized model, built by kiln without further passes, gives ORT's outputs."""
    engine = kiln.build(ir.serde.serialize_model(optimized), device="cpu", opt_level=0)
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed, size in enumerate(sizes):
        feeds = inputs(original, size, seed)
        expected = session.run(None, feeds)
        got = engine.run(feeds)
        assert list(got) == [o.name for o in session.get_outputs()]
        for (name, value), reference in zip(got.items(), expected):
            assert value.shape == reference.shape, (name, size)
            assert value.dtype == reference.dtype, (name, size)
            assert relative_error(value, reference) <= MAX_RELATIVE_ERROR, (name, size)


def actual_shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """The shape of every named tensor the model computes on ``feeds``."""
    engine = kiln.build(proto, device="cpu", opt_level=0, debug_outputs=True)
    return {name: value.shape for name, value in engine.run(feeds).items()
            if isinstance(value, np.ndarray)}


def assert_shapes_hold(inferred: ir.Model, original: onnx.ModelProto,
                       sizes: Sequence[dict[str, int]], inputs=random_inputs) -> int:
    """Every dim the model declares, evaluated at ``sizes``, is the size computed; returns how
    many symbolic dims were checked."""
    checked = 0
    for seed, size in enumerate(sizes):
        shapes = actual_shapes(original, inputs(original, size, seed))
        values = {parse_dim(name): n for name, n in size.items()}
        for node in inferred.graph:
            for value in node.outputs:
                if value.shape is None or value.name not in shapes:
                    continue
                actual = shapes[value.name]
                assert len(value.shape) == len(actual), (value.name, value.shape, actual)
                for dim, n in zip(value.shape, actual):
                    if isinstance(dim, int):
                        assert dim == n, (value.name, value.shape, actual)
                    elif dim.value is not None and not dim.value.startswith("unk__"):
                        assert int(parse_dim(dim.value).subs(values)) == n, (value.name, value.shape, actual)
                        checked += 1
    return checked


def export(module: torch.nn.Module, example: tuple, names: list[str],
           dynamic: dict[str, dict[int, str]], optimize: bool = False) -> onnx.ModelProto:
    """``module`` through torch's dynamo exporter, dimensions named in ``dynamic`` left dynamic."""
    return zoo.export_proto(module, example, names, dynamic, optimize, dim_range=(2, 1024))


def without_inner_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the shapes of its intermediate values forgotten, as other exporters write."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    del stripped.graph.value_info[:]
    for output in stripped.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()
    return stripped
