"""Generated Triton kernels for kiln::Pointwise against the ``ops`` reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which the test
set-up sets) on tiny CPU shapes; the GPU test builds a model and checks the engine runs its groups
with them, compiled.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.frontend.onnx import load_onnx
from kiln.kernels import triton_pointwise
from kiln.kernels.catalog import choices_for
from kiln.kernels.triton_pointwise import GeneratedKernelError, TritonPointwiseChoice
from kiln.lowering import lower
from kiln.ops.registry import lookup
from kiln.passes.fuse_pointwise import GroupPointwise

F32, F16, BOOL, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.INT64
CHOICE = TritonPointwiseChoice()
REFERENCE = lookup("Pointwise", 1, "kiln")


@pytest.fixture(autouse=True)
def fresh_kernel_cache(monkeypatch, tmp_path, request):
    """Kernels generated into a fresh cache. Tests on CPU tensors need Triton's interpreter, which
    the test set-up turns on where there is no GPU (and off where there is one)."""
    if request.node.get_closest_marker("gpu") is None and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (the GPU runs Triton)")
    monkeypatch.setattr(triton_pointwise, "cache_directory", lambda: tmp_path)
    triton_pointwise.load_kernel.cache_clear()
    yield
    triton_pointwise.load_kernel.cache_clear()


def make_model(nodes, inputs, outputs, opset: int = 20) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs],
        [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in
         [(*output, None)[:3] for output in outputs]],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("kiln", 1)])


def pointwise_step(proto: onnx.ModelProto):
    """The model's one kiln::Pointwise node (after shape inference and grouping) and its step."""
    model = GroupPointwise()(load_onnx(onnx.shape_inference.infer_shapes(proto))).model
    (node,) = [n for n in model.graph if (n.domain, n.op_type) == ("kiln", "Pointwise")]
    (step,) = [s for s in lower(model).graph.steps if s.spec.op_type == "Pointwise"]
    return node, step


def run_body(body: ir.Graph):
    """The body op by op with kiln's ops (what the runtime's Subgraph does)."""
    def run(*inputs):
        env = dict(zip(body.inputs, inputs))
        for node in body:
            attributes = {name: _attribute(attr) for name, attr in node.attributes.items()}
            impl = lookup(node.op_type, 20 if node.domain == "" else 1, node.domain)
            types = [0 if v is None or v.dtype is None else v.dtype.value for v in node.inputs]
            bound = impl.bind(attributes, torch.device("cpu"), len(node.outputs), types,
                              [0 if v.dtype is None else v.dtype.value for v in node.outputs])
            result = impl([env.get(v) for v in node.inputs], bound)
            env.update(zip(node.outputs, result if isinstance(result, tuple) else (result,)))
        return [env[v] for v in body.outputs]
    return run


def _attribute(attr: ir.Attr):
    if attr.type == ir.AttributeType.TENSOR:
        return torch.from_numpy(attr.value.numpy().copy())
    value = attr.value
    return value.decode() if isinstance(value, bytes) else value


def random(shape, dtype, generator) -> torch.Tensor:
    if dtype == BOOL:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype == I64:
        return torch.randint(-5, 6, shape, generator=generator)
    values = torch.randn(shape, generator=generator) * 2
    return values.to(torch.float16 if dtype == F16 else torch.float32)


def check(proto: onnx.ModelProto, inputs: dict | None = None, seed: int = 0):
    """The generated kernel and the reference agree on fresh random inputs (``inputs`` overrides)."""
    node, step = pointwise_step(proto)
    assert CHOICE.supports(step.spec, "cuda")
    recipe = json.loads(json.dumps(CHOICE.recipe(step.spec)))  # engines store recipes as JSON
    launch = CHOICE.launch(recipe, REFERENCE)
    generator = torch.Generator().manual_seed(seed)
    feeds = {i.name: random([d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type,
                            generator) for i in proto.graph.input}
    feeds.update(inputs or {})
    args = [feeds[v.name] for v in node.inputs]
    ours = launch.impl(args, {})
    expected = REFERENCE(args, {"body": run_body(node.attributes["body"].value)})
    assert len(ours) == len(expected)
    for y, ref in zip(ours, expected):
        assert y.dtype == ref.dtype and y.shape == ref.shape
        tolerance = 2e-3 if ref.dtype == torch.float16 else 2e-5
        torch.testing.assert_close(y, ref, rtol=tolerance, atol=tolerance, equal_nan=True)
    return step, recipe


def test_chain_with_broadcast_bias_and_residual():
    proto = make_model(
        [helper.make_node("Add", ["x", "b"], ["t"]),
         helper.make_node("Gelu", ["t"], ["g"]),
         helper.make_node("Add", ["g", "x"], ["y"])],
        [("x", F32, [2, 3, 5]), ("b", F32, [5])], [("y", F32)],
    )
    check(proto)


def unary_model(op: str, **attributes) -> onnx.ModelProto:
    """``op(x + b)``, so that the group has two nodes."""
    return make_model(
        [helper.make_node("Add", ["x", "b"], ["t"]), helper.make_node(op, ["t"], ["y"], **attributes)],
        [("x", F32, [3, 4]), ("b", F32, [4])], [("y", F32)],
    )


def binary_model(op: str, out=F32, dtype=F32) -> onnx.ModelProto:
    """``op(x + b, c)``: the second operand broadcast along columns."""
    return make_model(
        [helper.make_node("Add", ["x", "b"], ["t"]), helper.make_node(op, ["t", "c"], ["y"])],
        [("x", dtype, [3, 4]), ("b", dtype, [4]), ("c", dtype, [3, 1])], [("y", out)],
    )


UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Erf", "Floor",
         "Ceil", "Sin", "Cos", "Softsign", "Softplus", "Mish", "HardSwish", "LeakyRelu", "Elu", "Selu",
         "Celu", "HardSigmoid"]
ATTRIBUTED = [("LeakyRelu", {"alpha": 0.3}), ("Elu", {"alpha": 0.7}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
              ("Gelu", {}), ("Gelu", {"approximate": "tanh"}), ("Clip", {})]
BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min"]
COMPARISONS = ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]
ACTIVATIONS = [("Relu", []), ("LeakyRelu", [0.2]), ("Elu", [0.5]), ("Clip", [-0.5, 1.5]), ("Sigmoid", []),
               ("HardSigmoid", [0.25, 0.45]), ("Tanh", []), ("Silu", []), ("HardSwish", []), ("Gelu", []),
               ("GeluTanh", []), ("Mish", []), ("Softplus", []), ("", [])]


@pytest.mark.parametrize("op", UNARY)
def test_unary_op(op):
    check(unary_model(op))


@pytest.mark.parametrize(("op", "attributes"), ATTRIBUTED, ids=lambda v: str(v))
def test_op_with_attributes(op, attributes):
    check(unary_model(op, **attributes))


@pytest.mark.parametrize("op", BINARY)
def test_binary_op(op):
    check(binary_model(op))


def test_division_by_zero_and_nan_in_max_follow_the_reference():
    proto = make_model(
        [helper.make_node("Div", ["x", "z"], ["q"]), helper.make_node("Max", ["q", "x"], ["y"])],
        [("x", F32, [6]), ("z", F32, [6])], [("y", F32)],
    )
    x = torch.tensor([1.0, -1.0, 0.0, float("nan"), 2.0, -3.0])
    check(proto, {"x": x, "z": torch.tensor([0.0, 0.0, 0.0, 1.0, float("nan"), 0.5])})


@pytest.mark.parametrize("op", COMPARISONS)
def test_comparison_then_where(op):
    proto = make_model(
        [helper.make_node(op, ["x", "c"], ["m"]), helper.make_node("Where", ["m", "x", "c"], ["y"])],
        [("x", F32, [3, 4]), ("c", F32, [4])], [("y", F32)],
    )
    c = torch.randn(4)
    check(proto, {"c": c, "x": torch.where(torch.rand(3, 4) > 0.5, c, torch.randn(3, 4))})


def test_where_with_bool_input_logic_and_bool_output():
    proto = make_model(
        [helper.make_node("Not", ["m"], ["n"]),
         helper.make_node("And", ["n", "k"], ["a"]),
         helper.make_node("Or", ["a", "m"], ["o"]),
         helper.make_node("Xor", ["o", "k"], ["flags"]),
         helper.make_node("Where", ["flags", "x", "c"], ["y"])],
        [("m", BOOL, [2, 3]), ("k", BOOL, [3]), ("x", F32, [2, 3]), ("c", F32, [])],
        [("y", F32), ("flags", BOOL)],
    )
    check(proto)


def test_integer_arithmetic_and_casts():
    proto = make_model(
        [helper.make_node("Mul", ["i", "j"], ["p"]),
         helper.make_node("Max", ["p", "j"], ["q"]),
         helper.make_node("Cast", ["q"], ["qf"], to=F32),
         helper.make_node("Cast", ["x"], ["xi"], to=I64),  # truncates toward zero
         helper.make_node("Sub", ["xi", "q"], ["d"]),
         helper.make_node("Cast", ["d"], ["df"], to=F16),
         helper.make_node("Cast", ["qf"], ["h"], to=F16),
         helper.make_node("IsNaN", ["x"], ["nan"]),
         helper.make_node("Cast", ["nan"], ["nanf"], to=F32),
         helper.make_node("Add", ["qf", "nanf"], ["y"])],
        [("i", I64, [2, 3]), ("j", I64, [3]), ("x", F32, [2, 3])],
        [("y", F32), ("df", F16), ("h", F16)],
    )
    check(proto)


def test_mixed_float16_and_float32_inputs_with_several_outputs():
    proto = make_model(
        [helper.make_node("Cast", ["h"], ["hf"], to=F32),
         helper.make_node("Mul", ["hf", "x"], ["p"]),
         helper.make_node("Sigmoid", ["p"], ["s"]),
         helper.make_node("Cast", ["s"], ["sh"], to=F16),
         helper.make_node("Add", ["sh", "h"], ["y"])],
        [("h", F16, [2, 3, 4]), ("x", F32, [2, 3, 4])], [("y", F16), ("p", F32)],
    )
    _, recipe = check(proto)
    assert recipe["output_types"] == [F32, F16]  # outputs in the order the group makes them


@pytest.mark.parametrize("shapes", [
    ([2, 3, 4], []),            # scalar
    ([2, 3, 4], [4]),           # row
    ([2, 3, 4], [3, 1]),        # column
    ([2, 4, 3, 3], [4, 1, 1]),  # channels
    ([1, 2, 1, 2, 3, 2], [2, 1, 1, 1, 2]),  # rank 6
    ([3], [2, 1, 3]),           # the second input sets the shape
], ids=str)
def test_broadcasting(shapes):
    x_shape, b_shape = shapes
    proto = make_model(
        [helper.make_node("Sub", ["x", "b"], ["t"]), helper.make_node("Mul", ["t", "t"], ["y"])],
        [("x", F32, x_shape), ("b", F32, b_shape)], [("y", F32)],
    )
    check(proto)


def test_shape_of_more_dimensions_than_merge_runs_the_body():
    proto = make_model(
        [helper.make_node("Sub", ["x", "b"], ["t"]), helper.make_node("Mul", ["t", "t"], ["y"])],
        [("x", F32, [2] * 7), ("b", F32, [2, 1, 2, 1, 2, 1, 2])], [("y", F32)],
    )
    node, step = pointwise_step(proto)
    impl = CHOICE.launch(CHOICE.recipe(step.spec), REFERENCE).impl
    args = [torch.randn(2, 2, 2, 2, 2, 2, 2), torch.randn(2, 1, 2, 1, 2, 1, 2)]
    body = run_body(node.attributes["body"].value)
    torch.testing.assert_close(impl(args, {"body": body}), REFERENCE(args, {"body": body}))
    with pytest.raises(GeneratedKernelError, match="more than 6 dimensions"):
        impl(args, {})


def test_channels_last_and_transposed_inputs_keep_their_layout():
    proto = make_model(
        [helper.make_node("Add", ["x", "r"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        [("x", F32, [2, 3, 4, 5]), ("r", F32, [2, 3, 4, 5])], [("y", F32)],
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 5, 4, 3, generator=generator).transpose(1, 3)
    check(proto, {"x": x, "r": r})
    node, step = pointwise_step(proto)
    (y,) = CHOICE.launch(CHOICE.recipe(step.spec), REFERENCE).impl([x, r], {})
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_constants_inlined_as_scalars_and_vectors():
    scale = numpy_helper.from_array(np.linspace(-1, 1, 5, dtype=np.float32), "scale")
    proto = make_model(
        [helper.make_node("Constant", [], ["scale"], value=scale),
         helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
         helper.make_node("Constant", [], ["low"], value=numpy_helper.from_array(np.float32(-np.inf))),
         helper.make_node("Mul", ["x", "scale"], ["t"]),
         helper.make_node("Pow", ["t", "two"], ["p"]),
         helper.make_node("Max", ["p", "low"], ["m"]),
         helper.make_node("Clip", ["m", "", "two"], ["y"])],
        [("x", F32, [3, 5])], [("y", F32)],
    )
    _, recipe = check(proto)
    assert len(recipe["constants"]) == 1  # the vector; the scalars are in the source


def test_kiln_activation_with_its_parameters():
    nodes = [helper.make_node("Add", ["x", "b"], ["t0"])]
    for k, (name, params) in enumerate(ACTIVATIONS):
        parameters = {"activation_params": params} if params else {}
        nodes.append(helper.make_node("Activation", [f"t{k}"], [f"t{k + 1}"], domain="kiln", activation=name,
                                      **parameters))
    proto = make_model(nodes, [("x", F32, [4, 6]), ("b", F32, [6])], [(f"t{len(ACTIVATIONS)}", F32, [4, 6])])
    check(proto)


@pytest.mark.parametrize("nodes", [
    [helper.make_node("Round", ["t"], ["y"])],             # no exact Triton form here
    [helper.make_node("Pow", ["t", "x"], ["y"])],          # a general exponent
    [helper.make_node("Mod", ["t", "x"], ["y"], fmod=1)],
], ids=lambda nodes: nodes[0].op_type)
def test_unsupported_body_is_refused(nodes):
    proto = make_model([helper.make_node("Add", ["x", "x"], ["t"]), *nodes], [("x", F32, [3])], [("y", F32)])
    _, step = pointwise_step(proto)
    assert not CHOICE.supports(step.spec, "cuda")
    assert [c.id for c in choices_for(step.spec, "cuda")] == ["ops"]


def test_integer_division_is_refused():
    proto = make_model(
        [helper.make_node("Add", ["i", "i"], ["t"]), helper.make_node("Div", ["t", "j"], ["y"])],
        [("i", I64, [3]), ("j", I64, [3])], [("y", I64)],
    )
    _, step = pointwise_step(proto)
    assert not CHOICE.supports(step.spec, "cuda")


def test_cuda_only_and_first_in_its_list():
    _, step = pointwise_step(unary_model("Relu"))
    assert not CHOICE.supports(step.spec, "cpu")
    assert [c.id for c in choices_for(step.spec, "cuda")] == ["triton-pointwise", "ops"]


def test_equal_groups_share_one_spec_and_different_ones_do_not():
    proto = make_model(
        [helper.make_node("Add", ["x", "b"], ["t"]), helper.make_node("Relu", ["t"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["u"]), helper.make_node("Relu", ["u"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["n"]),
         helper.make_node("Add", ["n", "b"], ["v"]), helper.make_node("Sigmoid", ["v"], ["y"])],
        [("x", F32, [2, 4]), ("b", F32, [4]), ("w", F32, [4, 4])], [("y", F32)],
    )
    model = GroupPointwise()(load_onnx(onnx.shape_inference.infer_shapes(proto))).model
    specs = [s.spec for s in lower(model).graph.steps if s.spec.op_type == "Pointwise"]
    assert len(specs) == 3 and specs[0] == specs[1] != specs[2]


def test_a_kernel_that_fails_to_load_raises_a_kiln_error():
    with pytest.raises(GeneratedKernelError, match="cannot load the generated pointwise kernel"):
        triton_pointwise.load_kernel("this is not python")


@pytest.mark.gpu
def test_engine_runs_its_groups_with_generated_kernels():
    import kiln

    generator = np.random.default_rng(0)
    weights = [numpy_helper.from_array(generator.standard_normal(shape).astype(np.float32) * 0.1, name)
               for name, shape in [("w1", [64, 64]), ("b1", [64]), ("w2", [64, 32]), ("b2", [32])]]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
         helper.make_node("Gelu", ["h"], ["g"]), helper.make_node("Sigmoid", ["g"], ["s"]),
         helper.make_node("Mul", ["g", "s"], ["gs"]), helper.make_node("Add", ["gs", "x"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["u"]),
         helper.make_node("Tanh", ["u"], ["t"]), helper.make_node("Mul", ["t", "u"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [helper.make_tensor_value_info("y", F32, ["batch", 32])], weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    engine = kiln.build(proto, device="cuda", precision="fp16")
    choices = [layer["choice"] for layer in engine.layers if layer["op"] == "kiln::Pointwise"]
    assert choices and set(choices) == {"triton-pointwise"}
    cpu = kiln.build(proto, device="cpu")
    for batch in (3, 16, 16):  # the second run of a shape replays a CUDA graph
        x = generator.standard_normal((batch, 64)).astype(np.float32)
        ours = torch.as_tensor(engine.run({"x": torch.from_numpy(x).cuda()})["y"]).float().cpu()
        expected = torch.as_tensor(cpu.run({"x": x})["y"]).float()
        torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2)
