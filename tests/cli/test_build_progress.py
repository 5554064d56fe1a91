"""Build progress: events from the library, drawn by kiln build (bars, JSON lines, quiet, verbose)."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.cli.main import main
from kiln.cli.progress import PhaseDisplay
from kiln.engine.progress import BUILD_PHASES
from kiln.errors import KilnError
from tests.graphs import mlp


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


def unsupported_op_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom", name="mystery")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )


def test_library_reports_each_phase_in_order():
    events = []
    kiln.build(mlp(), device="cpu", opt_level=0, progress=events.append)
    starts = [e.phase for e in events if e.state == "start"]
    ends = [e.phase for e in events if e.state == "end"]
    assert starts == ends == list(BUILD_PHASES)
    choices = [e for e in events if e.phase == "tuning"]
    total = choices[0].total
    assert total and [e.completed for e in choices if e.state == "advance"] == list(range(1, total + 1))
    assert all(e.seconds is not None and e.seconds >= 0 for e in events if e.state == "end")


def test_a_failing_phase_reports_failed():
    events = []
    with pytest.raises(KilnError):
        kiln.build(unsupported_op_model(), device="cpu", progress=events.append)
    assert events[-1].state == "failed" and events[-1].phase == "lowering"


def test_log_json_is_one_object_per_line(model_file, tmp_path, capsys):
    args = ["build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "--opt-level", "0"]
    assert main([*args, "--log-json"]) == 0  # level 0: one kernel spec per node
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    phases = [e["phase"] for e in events if e["state"] == "end"]
    assert phases == [*BUILD_PHASES, "write"]
    assert all({"phase", "state"} <= set(e) for e in events)
    assert next(e for e in events if e["phase"] == "tuning" and e["state"] == "start")["total"] == 4


def test_log_json_reports_the_failed_phase(tmp_path, capsys):
    model = tmp_path / "custom.onnx"
    onnx.save(unsupported_op_model(), model)
    assert main(["build", str(model), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "--log-json"]) == 1
    captured = capsys.readouterr()
    last = json.loads(captured.out.splitlines()[-1])
    assert last["phase"] == "lowering" and last["state"] == "failed"
    assert captured.err.count("\n") == 1  # the error itself stays one line


def test_quiet_prints_nothing(model_file, tmp_path, capsys):
    assert main(["build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_default_prints_the_summary(model_file, tmp_path, capsys):
    assert main(["build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--device", "cpu"]) == 0
    assert "built" in capsys.readouterr().err


def test_verbose_prints_each_phase_summary(model_file, tmp_path, capsys):
    args = ["build", str(model_file), "-o", str(tmp_path / "e.kiln"), "--device", "cpu", "--opt-level", "0"]
    assert main([*args, "--verbose"]) == 0  # level 0: one layer per node
    err = capsys.readouterr().err
    for line in ("import: 4 nodes", "lowering: 4 layers", "tuning: 4 distinct kernel specs, 0 timed", "write:"):
        assert line in err


def test_phase_display_draws_bars_on_a_terminal():
    from rich.console import Console

    console = Console(force_terminal=True, width=100, record=True)
    events = []
    kiln.build(mlp(), device="cpu", opt_level=0, progress=events.append)
    with PhaseDisplay(console) as display:
        for event in events:
            display(event)
    text = console.export_text()
    for phase in BUILD_PHASES:
        assert phase in text
    assert "4/4" in text and "━" in text


def test_debug_outputs_expose_every_layer(model_file, tmp_path):
    engine_path = tmp_path / "debug.kiln"
    assert main(["build", str(model_file), "-o", str(engine_path), "--device", "cpu", "--opt-level", "0", "--debug-outputs", "-q"]) == 0
    engine = kiln.load(engine_path)
    assert [o.name for o in engine.outputs] == ["y", "hidden", "xw", "xwb"]  # the model's first
    assert engine.manifest["debug_outputs"] is True
