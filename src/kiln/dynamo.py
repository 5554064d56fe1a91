"""``torch.compile(model, backend="kiln")``: the graphs dynamo captures run as kiln engines.

A graph is exported and built when it first runs, once per input signature (shapes, dtypes,
Python values): dynamo may hand a backend symbolic example inputs, while an engine is exported
from concrete ones. The module's parameters and buffers are baked into the engine as weights, so
kiln can fold and fuse them; a weight changed in place makes the next call build again.

What kiln cannot take runs in PyTorch, with a log warning that says why. Where the exporter names
torch operators it has no ONNX translation for (custom ops, typically), the graph is split around
them with torch.fx's ``CapabilityBasedPartitioner``: those operators run in PyTorch and the pieces
between them in kiln. Any other failure to export or build (an operator kiln does not implement,
say) runs that whole graph in PyTorch.

Build options come through ``torch.compile(model, backend="kiln", options={"opt_level": 2})``.
Inference only: the engines' outputs carry no autograd history.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

import kiln
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.frontend.torch import rejected_operators

log = logging.getLogger("kiln.dynamo")

MAX_SIGNATURES = 8  # engines built per graph; calls with further input signatures run in PyTorch
_PIECE_PREFIX = "kiln_piece_"
_CALLS = ("call_function", "call_method", "call_module")  # the nodes a piece may hold


def kiln_backend(
    graph_module: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The dynamo backend: ``graph_module`` runs as kiln engines, built at its first calls."""
    overrides = dict(options or {})
    BuildConfig().replace(**overrides)  # a misspelled option fails now, not at the first call
    if mode is not None:
        log.info("the kiln backend has no modes; ignoring mode=%r", mode)
    return KilnGraph(graph_module, overrides)


class KilnGraph(torch.nn.Module):
    """A captured graph run as one kiln engine per input signature, or in PyTorch where kiln
    cannot take it (a module, so that a split graph can hold its kiln pieces as submodules)."""

    _numbers = itertools.count()

    def __init__(self, graph_module: torch.fx.GraphModule, overrides: dict[str, Any]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.overrides = overrides
        self.label = f"graph {next(self._numbers)}"
        self._runners: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._instead: Callable[..., Any] | None = None  # the PyTorch (or split) graph, for good

    def forward(self, *args: Any) -> Any:
        if self._instead is not None:
            return self._instead(*args)
        key = _signature(args)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = self._build(args)
        return runner(*args)

    def _build(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        if len(self._runners) >= MAX_SIGNATURES:
            log.warning(
                "%s has run with %d input signatures; further ones run in PyTorch (kiln.compile "
                "with dynamic_shapes builds one engine for varying sizes)", self.label, MAX_SIGNATURES,
            )
            return self.graph_module.forward
        weights = {i: arg for i, arg in enumerate(args) if _is_weight(arg)}
        live = [i for i in range(len(args)) if i not in weights]
        module = _WeightsBaked(self.graph_module, weights, len(args))
        # The graph's device, even when every input on it is a weight.
        on_cuda = any(isinstance(arg, torch.Tensor) and arg.is_cuda for arg in args)
        overrides = {"device": "cuda" if on_cuda else "cpu", **self.overrides}
        try:
            compiled = kiln.compile(module, tuple(args[i] for i in live), **overrides)
        except KilnError as error:
            # Torch operators the exporter names as untranslatable are split off; any other
            # failure (an ONNX operator kiln does not implement, say) leaves the graph to PyTorch.
            operators = rejected_operators(error)
            split = _split_around(self.graph_module, operators, self.overrides) if operators else None
            if split is None:
                return self._run_in_pytorch(str(error))
            log.warning(
                "%s: the ONNX exporter cannot translate %s; those run in PyTorch, the rest of the "
                "graph in kiln", self.label, ", ".join(sorted(operators)),
            )
            self._instead = split
            return split
        log.info(
            "%s runs in kiln: %d layers on %s", self.label, len(compiled.engine.layers),
            compiled.engine.device,
        )
        return lambda *call_args: compiled(*[call_args[i] for i in live])

    def _run_in_pytorch(self, reason: str) -> Callable[..., Any]:
        log.warning("%s runs in PyTorch: %s", self.label, reason)
        self._instead = self.graph_module.forward
        return self._instead


class _WeightsBaked(torch.nn.Module):
    """The graph with its weight inputs held as buffers, so they export as constants."""

    def __init__(
        self, graph_module: torch.fx.GraphModule, weights: dict[int, torch.Tensor], arity: int
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.arity = arity
        self.training = False  # the graph encodes its train/eval behaviour; this flag only
        # feeds the exporter's warning about modules left in training mode
        self.weight_positions = frozenset(weights)
        for position, weight in weights.items():
            self.register_buffer(f"weight_{position}", weight.detach())

    def forward(self, *live: Any) -> Any:
        remaining = iter(live)
        args = [
            getattr(self, f"weight_{i}") if i in self.weight_positions else next(remaining)
            for i in range(self.arity)
        ]
        return self.graph_module(*args)


class _Exportable(OperatorSupportBase):
    def __init__(self, rejected: set[str]) -> None:
        super().__init__()
        self.rejected = rejected

    def is_node_supported(self, submodules: Mapping[str, torch.nn.Module], node: torch.fx.Node) -> bool:
        return node.op in _CALLS and str(node.target) not in self.rejected


def _split_around(
    graph_module: torch.fx.GraphModule, rejected: set[str], overrides: dict[str, Any]
) -> Callable[..., Any] | None:
    """The graph with each stretch of exportable nodes moved into a :class:`KilnGraph`, or None
    when no stretch is left (single exportable nodes stay in PyTorch: not worth an engine)."""
    partitioner = CapabilityBasedPartitioner(graph_module, _Exportable(rejected))
    partitions = partitioner.propose_partitions()
    if not partitions:
        return None
    split = partitioner.fuse_partitions(partitions, prefix=_PIECE_PREFIX)
    for name, piece in list(split.named_children()):
        if name.startswith(_PIECE_PREFIX):
            setattr(split, name, KilnGraph(piece, overrides))
    return split.forward


def _is_weight(value: Any) -> bool:
    # Dynamo passes a module's parameters and buffers as graph inputs, marking them static. Where a
    # torch version does not mark buffers, they stay engine inputs: correct, only less folded.
    return isinstance(value, torch.nn.Parameter) or (
        isinstance(value, torch.Tensor) and getattr(value, "_dynamo_static_input_type", None) is not None
    )


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What an engine is specific to: input shapes, dtypes and devices, Python values, and the
    identity and version (bumped by in-place writes) of the weights baked into it."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            weight = (id(arg), arg.data_ptr(), arg._version) if _is_weight(arg) else None
            key.append((tuple(arg.shape), arg.dtype, arg.device, weight))
        else:
            key.append((type(arg), arg))
    return tuple(key)
