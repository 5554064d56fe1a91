"""The static memory plan: lifetimes, sizes and arena offsets of a lowered graph's activations."""

from __future__ import annotations

import itertools

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.engine.memory import ALIGNMENT, MemoryPlan, plan_memory
from kiln.frontend.onnx import load_onnx
from kiln.lowering import KernelSpec, LoweredGraph, Step, ValueType, lower
from kiln.passes import optimize
from tests.graphs import mlp
from tests.models import zoo

FLOAT = TensorProto.FLOAT


def _tensor(*shape: int | str | None, dtype: int = FLOAT) -> ValueType:
    return ValueType("tensor", dtype, tuple(shape))


def _step(name: str, inputs: list[str], outputs: dict[str, ValueType | None],
          attributes: dict | None = None) -> Step:
    spec = KernelSpec.create("Relu", "", 17, {}, tuple(None for _ in inputs), tuple(outputs.values()))
    return Step(name, spec, list(inputs), list(outputs), attributes or {}, [name], ["Relu"])


def _graph(steps: list[Step], outputs: list[str], inputs: tuple[str, ...] = ("x",)) -> LoweredGraph:
    return LoweredGraph("g", list(inputs), outputs, [None] * len(inputs), [None] * len(outputs), {}, steps, [])


def _chain(*units: int) -> LoweredGraph:
    """x -> v0 -> v1 -> ... with value i of ``units[i]`` * 256 bytes (float32); the last is the output."""
    steps, previous = [], "x"
    for index, count in enumerate(units):
        steps.append(_step(f"s{index}", [previous], {f"v{index}": _tensor(count * 64)}))
        previous = f"v{index}"
    return _graph(steps, [previous])


def _lowered(model: onnx.ModelProto, opt_level: int = 3) -> LoweredGraph:
    ir_model = load_onnx(model)
    if opt_level:
        ir_model, _ = optimize(ir_model, opt_level, "fp32", {})
    return lower(ir_model).graph


def _check_invariants(plan: MemoryPlan) -> None:
    """Exhaustively: values alive together never share bytes; the arena holds every value."""
    for name, offset in plan.offsets.items():
        assert offset % ALIGNMENT == 0, name
        assert offset + plan.sizes[name] <= plan.arena_bytes, name
    for a, b in itertools.combinations(plan.sizes, 2):
        (a0, a1), (b0, b1) = plan.lifetimes[a], plan.lifetimes[b]
        if a0 <= b1 and b0 <= a1 and plan.sizes[a] and plan.sizes[b]:
            apart = (plan.offsets[a] + plan.sizes[a] <= plan.offsets[b]
                     or plan.offsets[b] + plan.sizes[b] <= plan.offsets[a])
            assert apart, f"{a} {plan.lifetimes[a]} and {b} {plan.lifetimes[b]} overlap in memory"
    assert plan.activation_bytes == sum(plan.sizes.values())
    assert plan.peak_bytes() <= plan.arena_bytes <= max(plan.activation_bytes, 0) + ALIGNMENT * len(plan.sizes)
    assert plan.arena_bytes % ALIGNMENT == 0


def test_a_chain_reuses_memory_two_adjacent_values_at_a_time():
    plan = plan_memory(_chain(4, 1, 3, 2), {})
    _check_invariants(plan)
    assert plan.lifetimes == {"v0": (0, 1), "v1": (1, 2), "v2": (2, 3), "v3": (3, 4)}
    assert plan.arena_bytes == 5 * 256  # v0 + v1 or v2 + v3: the largest adjacent pair
    assert plan.activation_bytes == 10 * 256
    assert plan.offsets["v0"] == plan.offsets["v2"] == 0  # never alive together


def test_equal_chain_needs_two_buffers():
    plan = plan_memory(_chain(*[8] * 10), {})
    _check_invariants(plan)
    assert plan.arena_bytes == 2 * 8 * 256
    assert set(plan.offsets.values()) == {0, 8 * 256}


def test_offsets_are_aligned_for_odd_sizes():
    steps = [_step("s0", ["x"], {"a": _tensor(3, dtype=TensorProto.UINT8), "b": _tensor(5)}),
             _step("s1", ["a", "b"], {"c": _tensor(7, dtype=TensorProto.INT16)})]
    plan = plan_memory(_graph(steps, ["c"]), {})
    _check_invariants(plan)
    assert plan.sizes == {"a": 3, "b": 20, "c": 14}
    assert sorted(plan.offsets.values()) == [0, 256, 512]
    assert plan.arena_bytes == 768


def test_sizes_use_the_storage_dtype():
    steps = [_step("s0", ["x"], {"u16": _tensor(2, 3, dtype=TensorProto.UINT16),
                                 "u32": _tensor(2, dtype=TensorProto.UINT32),
                                 "f16": _tensor(4, dtype=TensorProto.FLOAT16),
                                 "flag": _tensor(5, dtype=TensorProto.BOOL)})]
    plan = plan_memory(_graph(steps, ["u16", "u32", "f16", "flag"]), {})
    assert plan.sizes == {"u16": 24, "u32": 16, "f16": 8, "flag": 5}  # uint16 kept as int32 etc.


def test_values_of_unknown_size_are_dynamic():
    steps = [_step("s0", ["x"], {
        "strings": _tensor(4, dtype=TensorProto.STRING),
        "unknown_dim": _tensor(4, None),
        "unknown_rank": ValueType("tensor", FLOAT, None),
        "untyped": None,
        "sequence": ValueType("sequence", FLOAT, None),
        "optional": ValueType("optional", FLOAT, None),
        "known": _tensor(4),
    })]
    plan = plan_memory(_graph(steps, ["known"]), {})
    assert plan.dynamic == ["strings", "unknown_dim", "unknown_rank", "untyped", "sequence", "optional"]
    assert list(plan.sizes) == ["known"]
    assert plan.to_json()["dynamic"] == plan.dynamic


def test_symbolic_dims_are_dynamic_until_given():
    graph = _lowered(mlp(), opt_level=1)  # x: [batch, 4]; level 1 infers the other shapes
    unsized = plan_memory(graph, {})
    assert sorted(unsized.dynamic) == ["hidden", "xw", "xwb", "y"]
    assert unsized.sizes == {} and unsized.arena_bytes == 0
    sized = plan_memory(graph, {"batch": 3})
    assert sized.dynamic == []
    assert sized.sizes == {name: 3 * 4 * 4 for name in ("xw", "xwb", "hidden", "y")}
    _check_invariants(sized)


def test_symbol_expressions_are_evaluated():
    steps = [_step("s0", ["x"], {"flat": _tensor("batch*seq", 8)}),
             _step("s1", ["flat"], {"half": _tensor("floor(seq/2)", 8)}),
             _step("s2", ["half"], {"other": _tensor("batch*unknown_symbol")})]
    plan = plan_memory(_graph(steps, ["other"]), {"batch": 2, "seq": 5})
    assert plan.sizes == {"flat": 2 * 5 * 8 * 4, "half": 2 * 8 * 4}
    assert plan.dynamic == ["other"]


def test_graph_outputs_live_to_the_end_of_the_run():
    steps = [_step("s0", ["x"], {"early": _tensor(64)}),
             _step("s1", ["early"], {"a": _tensor(64)}),
             _step("s2", ["a"], {"b": _tensor(64)}),
             _step("s3", ["b"], {"c": _tensor(64)})]
    plan = plan_memory(_graph(steps, ["c", "early"]), {})
    assert plan.lifetimes["early"] == (0, 4) and plan.lifetimes["c"] == (3, 4)
    assert plan.outputs == ["early", "c"]
    assert plan.to_json()["outputs"] == ["early", "c"]
    assert all(plan.offsets[name] != plan.offsets["early"] for name in ("a", "b", "c"))
    _check_invariants(plan)
    # the model's outputs, read later by other steps, still end with the run
    mlp_plan = plan_memory(_lowered(mlp(), opt_level=1), {"batch": 1})
    assert mlp_plan.lifetimes["hidden"] == (2, 4) and mlp_plan.lifetimes["y"] == (3, 4)


def test_values_a_subgraph_reads_live_until_the_step_that_owns_it():
    body = _graph([_step("inner", ["outer"], {"inner_out": _tensor(64)})], ["inner_out"], inputs=())
    steps = [_step("s0", ["x"], {"outer": _tensor(64)}),
             _step("s1", ["x"], {"a": _tensor(64)}),
             _step("s2", ["a"], {"b": _tensor(64)}),
             _step("if", ["cond"], {"result": _tensor(64)},
                   attributes={"then_branch": {"graph": body}, "else_branch": {"graph": body}})]
    plan = plan_memory(_graph(steps, ["result"], inputs=("x", "cond")), {})
    assert plan.lifetimes["outer"] == (0, 3)
    assert plan.offsets["outer"] not in (plan.offsets["a"], plan.offsets["b"])
    _check_invariants(plan)


def test_unread_values_live_one_step():
    steps = [_step("s0", ["x"], {"used": _tensor(64), "unused": _tensor(64)}),
             _step("s1", ["used"], {"y": _tensor(64)})]
    plan = plan_memory(_graph(steps, ["y"]), {})
    assert plan.lifetimes["unused"] == (0, 0)
    assert plan.arena_bytes == 2 * 256  # y reuses 'unused'
    _check_invariants(plan)


def test_to_json_lists_every_placed_value():
    plan = plan_memory(_chain(1, 2), {})
    assert plan.to_json() == {
        "arena_bytes": 768, "activation_bytes": 768,
        "values": {"v0": [512, 256], "v1": [0, 512]}, "dynamic": [], "outputs": ["v1"],
    }


@pytest.fixture(scope="module")
def resnet_graph():
    torch.manual_seed(0)
    return _lowered(zoo.export_proto(zoo.ResNet(), (torch.randn(2, 3, 64, 64),), ["image"],
                                     {"image": {0: "batch"}}))


@pytest.fixture(scope="module")
def bert_graph():
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return _lowered(zoo.export_proto(zoo.BertEncoder(), (ids, mask), ["input_ids", "attention_mask"], dims))


@pytest.mark.parametrize("batch", [1, 8])
def test_resnet_plan_never_overlaps_live_values(resnet_graph, batch):
    plan = plan_memory(resnet_graph, {"batch": batch})
    assert plan.dynamic == []
    assert len(plan.sizes) == sum(1 for step in resnet_graph.steps for o in step.outputs if o)
    _check_invariants(plan)
    assert plan.arena_bytes < plan.activation_bytes / 2


def test_bert_plan_never_overlaps_live_values(bert_graph):
    plan = plan_memory(bert_graph, {"batch": 1, "seq": 16})
    _check_invariants(plan)
    assert plan.dynamic == []
    assert plan.arena_bytes < plan.activation_bytes / 2
    assert set(plan.outputs) == set(bert_graph.outputs)
    assert all(plan.lifetimes[name][1] == len(bert_graph.steps) for name in plan.outputs)


def test_unoptimized_graph_places_what_has_a_type():
    ids, mask = torch.randint(0, 1000, (1, 8)), torch.ones(1, 8, dtype=torch.int64)
    graph = _lowered(zoo.export_proto(zoo.BertEncoder(), (ids, mask), ["input_ids", "attention_mask"], {}),
                     opt_level=0)  # no shape inference at level 0: intermediates may lack a shape
    plan = plan_memory(graph, {})
    _check_invariants(plan)
    assert set(graph.outputs) <= set(plan.sizes)


def _static_chain_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="r1"),
             helper.make_node("Relu", ["b"], ["y"], name="r2")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", FLOAT, [1, 64, 64])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 64, 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_build_stores_the_plan_in_the_manifest():
    memory = kiln.build(_static_chain_model(), device="cpu", opt_level=1).manifest["memory"]
    size = 64 * 64 * 4
    assert memory == {
        "arena_bytes": 2 * size, "activation_bytes": 3 * size,
        "values": {"a": [0, size], "b": [size, size], "y": [0, size]},
        "dynamic": [], "outputs": ["y"],
    }
