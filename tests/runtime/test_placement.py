"""Host placement of shape arithmetic, checked on the plans of real models (no GPU needed)."""

from __future__ import annotations

import torch

import kiln
from kiln.kernels.launch import launcher
from kiln.runtime.placement import place


def _placement(engine):
    plan = engine.manifest["plan"]
    impls = [
        launcher(s["recipe"], s["op"], s["domain"], s["opset"], s["name"]).impl for s in plan["steps"]
    ]
    weights = {value: engine._data.tensors.get(key) for value, key in plan["weights"].items()}
    return plan, impls, place(plan["steps"], impls, weights, plan["outputs"])


def _host_slot_reads_stay_on_host(plan, impls, placement):
    """Every value read in a host slot lives on the host: nothing synchronises the GPU."""
    for index, (step, impl) in enumerate(zip(plan["steps"], impls)):
        for slot in impl.host_inputs:
            if slot < len(step["inputs"]) and step["inputs"][slot]:
                assert step["inputs"][slot] in placement.host_values, (step["name"], slot)


def test_dynamic_bert_keeps_its_shape_arithmetic_on_the_host(bert_onnx):
    engine = kiln.build(bert_onnx, device="cpu", opt_level=1)
    plan, impls, placement = _placement(engine)
    _host_slot_reads_stay_on_host(plan, impls, placement)
    ops = {plan["steps"][i]["op"] for i in placement.host_steps}
    assert {"Shape", "Concat"} & ops or {"Shape", "Gather"} & ops, ops
    assert not set(plan["outputs"]) & placement.host_values


def test_data_stays_on_the_device(resnet_onnx):
    engine = kiln.build(resnet_onnx, device="cpu")
    plan, impls, placement = _placement(engine)
    _host_slot_reads_stay_on_host(plan, impls, placement)
    for index in placement.host_steps:
        assert plan["steps"][index]["op"] not in ("Conv", "FusedConv", "MatMul", "Gemm")
    big = {v for v, key in plan["weights"].items() if engine._data.tensors[key].numel() > 1024}
    assert big and not big & placement.host_values


def test_a_value_also_read_as_data_stays_on_the_device():
    steps = [
        {"name": "shape", "op": "Shape", "domain": "", "opset": 17, "inputs": ["x"], "outputs": ["s"],
         "attributes": {}},
        {"name": "reshape", "op": "Reshape", "domain": "", "opset": 17, "inputs": ["x", "s2"],
         "outputs": ["y"], "attributes": {}},
        {"name": "concat", "op": "Concat", "domain": "", "opset": 17, "inputs": ["s", "k"],
         "outputs": ["s2"], "attributes": {}},
        {"name": "cast", "op": "Cast", "domain": "", "opset": 17, "inputs": ["s"], "outputs": ["f"],
         "attributes": {}},
        {"name": "mul", "op": "Mul", "domain": "", "opset": 17, "inputs": ["y", "f"], "outputs": ["z"],
         "attributes": {}},
    ]
    steps[2], steps[1] = steps[1], steps[2]
    impls = [launcher({"choice": "ops"}, s["op"], "", 17, s["name"]).impl for s in steps]
    placement = place(steps, impls, {"k": torch.tensor([-1])}, ["z"])
    # s feeds Concat (host) but also Cast -> Mul with device data: Cast can't run on the host,
    # so s must be on the device; k and s2 are read on the host only through Concat -> Reshape.
    assert "s" not in placement.host_values and "f" not in placement.host_values
    assert "z" not in placement.host_values
