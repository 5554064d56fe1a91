"""kiln debug reduce: delta debugging down to the nodes that make a check fail, as valid ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.cli.main import main
from kiln.cli.reduce import Subgraphs, minimize

PLANTED = "planted_failure"
UNARY = ["Relu", "Neg", "Abs", "Sigmoid"]


def chain_with_branches(nodes: int = 50, planted_at: int = 31) -> onnx.ModelProto:
    """A chain of ``nodes`` nodes (unary ops, adds of constants, a residual Add every 7 nodes)
    with one Softsign named ``planted_failure``."""
    graph_nodes, constants = [], []
    value, skip = "x", "x"
    for i in range(nodes):
        out = f"v{i}"
        if i == planted_at:
            graph_nodes.append(helper.make_node("Softsign", [value], [out], name=PLANTED))
        elif i % 7 == 6:  # residual: reads a value from a few nodes back
            graph_nodes.append(helper.make_node("Add", [value, skip], [out], name=f"residual_{i}"))
            skip = out
        elif i % 5 == 2:
            constants.append(numpy_helper.from_array(np.full(4, 0.5, np.float32), f"c{i}"))
            graph_nodes.append(helper.make_node("Add", [value, f"c{i}"], [out], name=f"add_{i}"))
        else:
            op = UNARY[i % len(UNARY)]
            graph_nodes.append(helper.make_node(op, [value], [out], name=f"{op.lower()}_{i}"))
        value = out
    graph = helper.make_graph(
        graph_nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["n", 4])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(chain_with_branches(), path)
    return path


def test_shrinks_50_nodes_to_the_planted_failure(model_file, tmp_path, capsys):
    reduced_path = tmp_path / "reduced.onnx"
    # grep finds the node's name in the protobuf: the check fails while the planted node is in.
    check = f"! grep -q {PLANTED} {{model}}"
    assert main(["debug", "reduce", str(model_file), "--check", check, "-o", str(reduced_path)]) == 0
    reduced = onnx.load(reduced_path)
    onnx.checker.check_model(reduced, full_check=True)
    assert len(reduced.graph.node) <= 3
    assert PLANTED in [node.name for node in reduced.graph.node]
    [cut] = reduced.graph.input  # the value the planted node read, now a typed graph input
    assert cut.name == "v30" and cut.type.tensor_type.elem_type == TensorProto.FLOAT
    assert "from 50 to" in capsys.readouterr().err


def test_fail_regex_ignores_other_failures(model_file, tmp_path):
    reduced_path = tmp_path / "reduced.onnx"
    # Fails on every candidate, but says "chased" only while the planted node is in.
    check = f"grep -q {PLANTED} {{model}} && echo chased; exit 1"
    assert main([
        "debug", "reduce", str(model_file), "--check", check, "--fail-regex", "chased",
        "-o", str(reduced_path),
    ]) == 0
    assert [node.name for node in onnx.load(reduced_path).graph.node] == [PLANTED]


def test_minimize_keeps_every_node_the_failure_needs():
    model = chain_with_branches(nodes=20, planted_at=9)
    subgraphs = Subgraphs(model)
    names = [node.name for node in subgraphs.nodes]
    needed = {names.index("residual_13"), names.index(PLANTED)}

    def fails(keep):
        return needed <= set(keep) and subgraphs.extract(keep) is not None

    kept = minimize(len(names), fails)
    assert set(kept) == needed
    reduced = subgraphs.extract(kept)
    # Two pieces, cut from the rest: each read value not made inside is a typed input.
    assert {i.name for i in reduced.graph.input} == {"v8", "v12", "v6"}
    assert [o.name for o in reduced.graph.output] == ["v9", "v13"]


def test_extract_keeps_only_the_initializers_it_reads():
    model = chain_with_branches(nodes=10, planted_at=9)
    subgraphs = Subgraphs(model)
    add = [node.name for node in subgraphs.nodes].index("add_2")
    reduced = subgraphs.extract([add])
    assert [t.name for t in reduced.graph.initializer] == ["c2"]
    assert [i.name for i in reduced.graph.input] == ["v1"]


def test_a_check_that_passes_on_the_model_is_an_error(model_file, tmp_path, capsys):
    code = main(["debug", "reduce", str(model_file), "--check", "true {model}", "-o", str(tmp_path / "r.onnx")])
    assert code == 1 and "nothing to reduce" in capsys.readouterr().err


def test_check_without_model_placeholder_is_a_usage_error(model_file):
    with pytest.raises(SystemExit) as exit_info:
        main(["debug", "reduce", str(model_file), "--check", "false"])
    assert exit_info.value.code == 2
