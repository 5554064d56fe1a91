"""Run a plan graph: each step's launcher in order, releasing values after their last use."""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.errors import EngineFormatError, ShapeError
from kiln.kernels.launch import launcher
from kiln.ops.registry import OpImpl
from kiln.runtime.placement import Placement, place
from kiln.runtime.timing import Timeline


@dataclass
class _BoundStep:
    name: str
    op: str
    impl: OpImpl
    inputs: list[str | None]
    outputs: list[str | None]
    attributes: dict[str, Any]
    graphs: dict[str, Any]  # attribute name -> Program or list of Programs
    release: list[str]


class WeightStore:
    """An engine's tensors as loaded (host memory), copied to the device once, when first asked."""

    def __init__(self, tensors: Mapping[str, Any], device: torch.device) -> None:
        self.tensors = tensors
        self.device = device
        self._on_device: dict[str, Any] = {}

    def get(self, key: str, on_host: bool = False) -> Any:
        tensor = self.tensors[key]
        if on_host or not isinstance(tensor, torch.Tensor):
            return tensor
        if key not in self._on_device:
            self._on_device[key] = tensor.to(self.device)
        return self._on_device[key]


_HOST = torch.device("cpu")


class Program:
    """A plan graph bound to its launchers and weights, ready to run.

    On a GPU, shape arithmetic stays in host memory (see :mod:`kiln.runtime.placement`).
    """

    def __init__(self, graph: dict[str, Any], weights: WeightStore, device: torch.device):
        self.device = device
        self.name = graph["name"]
        self.inputs: list[str] = graph["inputs"]
        self.outputs: list[str] = graph["outputs"]
        self.release_unused_inputs: list[str] = graph["release_unused_inputs"]
        steps = graph["steps"]
        launches = [
            launcher(step["recipe"], step["op"], step["domain"], step["opset"], step["name"])
            for step in steps
        ]
        impls = [launch.impl for launch in launches]
        if device.type == "cpu":
            placement = Placement(frozenset(), frozenset())
        else:
            sources = {value: weights.tensors[key] for value, key in graph["weights"].items()}
            placement = place(steps, impls, sources, self.outputs)
        self.host_values = placement.host_values
        self.weights = {
            value: weights.get(key, on_host=value in placement.host_values)
            for value, key in graph["weights"].items()
        }
        for step, launch in zip(steps, launches):
            for index, prepare in launch.prepare_weights.items():
                name = step["inputs"][index] if index < len(step["inputs"]) else None
                if name in self.weights and name not in self.host_values:
                    self.weights[name] = prepare(self.weights[name])
        self.steps = [
            self._bind(step, impl, weights, _HOST if i in placement.host_steps else device)
            for i, (step, impl) in enumerate(zip(steps, impls))
        ]

    def _bind(
        self, step: dict[str, Any], impl: OpImpl, weights: WeightStore, device: torch.device
    ) -> _BoundStep:
        attributes, graphs = {}, {}
        for name, encoded in step["attributes"].items():
            (kind, value), = encoded.items()
            if kind == "graph":
                graphs[name] = Program(value, weights, self.device)
            elif kind == "graphs":
                graphs[name] = [Program(g, weights, self.device) for g in value]
            elif kind == "tensor":
                attributes[name] = weights.get(value, on_host=device.type == "cpu")
            elif kind == "tensors":
                attributes[name] = [weights.get(k, on_host=device.type == "cpu") for k in value]
            else:
                attributes[name] = value
        inputs = list(step["inputs"])
        while inputs and inputs[-1] is None:  # trailing omitted inputs are not passed at all
            inputs.pop()
        return _BoundStep(
            name=step["name"],
            op=step["op"],
            impl=impl,
            inputs=inputs,
            outputs=step["outputs"],
            attributes=impl.bind(
                attributes, device, len(step["outputs"]), step["input_types"], step["output_types"]
            ),
            graphs=graphs,
            release=step["release"],
        )

    def run(self, env: MutableMapping[str, Any], timeline: Timeline | None = None) -> list[Any]:
        """Run on ``env`` (graph inputs, and enclosing scopes for subgraphs); return the outputs.

        ``timeline``, when given, is marked with each step's name as the step ends.
        """
        for name in self.release_unused_inputs:
            env.pop(name, None)
        for step in self.steps:
            args = [env[name] if name is not None else None for name in step.inputs]
            attributes = step.attributes
            if step.graphs:
                attributes = {**attributes, **_bind_graphs(step.graphs, env)}
            try:
                result = step.impl(args, attributes)
            except (RuntimeError, ValueError, IndexError, TypeError) as error:
                raise ShapeError(
                    f"layer {step.name!r} ({step.op}) failed: {error}".splitlines()[0]
                ) from error
            if isinstance(result, tuple):
                for name, value in zip(step.outputs, result):
                    if name is not None:
                        env[name] = value
            elif step.outputs[0] is not None:
                env[step.outputs[0]] = result
            for name in step.release:
                env.pop(name, None)
            if timeline is not None:
                timeline.mark(step.name)
        try:
            return [env[name] for name in self.outputs]
        except KeyError as missing:
            raise EngineFormatError(f"graph {self.name!r} never computes output {missing}") from None

    def new_env(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.weights, **inputs}


class Subgraph:
    """A graph attribute bound to the scope it runs in (implements ``kiln.ops.Subgraph``)."""

    def __init__(self, program: Program, scope: Mapping[str, Any]) -> None:
        self.program = program
        self.scope = scope
        self.input_names = program.inputs
        self.output_names = program.outputs

    def __call__(self, *inputs: Any) -> list[Any]:
        local = {**self.program.weights, **dict(zip(self.program.inputs, inputs))}
        return self.program.run(ChainMap(local, self.scope))


def _bind_graphs(graphs: dict[str, Any], env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: [Subgraph(p, env) for p in program] if isinstance(program, list) else Subgraph(program, env)
        for name, program in graphs.items()
    }


def string_tensor(entry: dict[str, Any]) -> np.ndarray:
    return np.array(entry["values"], dtype=object).reshape(entry["shape"])
