"""One registry of ONNX operator implementations, keyed by (domain, op type, first opset).

An implementation is a plain PyTorch function. Inputs arrive positionally (``None`` for an omitted
optional input), attributes as keyword arguments under their ONNX names (defaults live in the
function's signature, as in the ONNX spec). It returns one value, or a tuple when the node has
several outputs. Sequences are Python lists, an empty optional is ``None``.

Keyword-only parameters the caller fills in when a function declares them: ``_device`` (the
torch device to create new tensors on), ``_num_outputs`` (how many outputs the node asks for), and
``_input_types`` / ``_output_types`` (the ONNX element types the model declares for the node's
values, 0 where unknown — they tell apart types that share a storage dtype, such as int4 and int8).
Graph attributes arrive as :class:`Subgraph` callables.

``host_inputs`` lists the inputs an implementation reads on the host (a target shape, slice
bounds, axes): on a GPU the runtime keeps such values in host memory where it can, so reading
them costs no device synchronisation and the step can be captured in a CUDA graph.
``metadata_only`` marks ops whose outputs depend only on their inputs' shapes (Shape, Size): their
outputs can live in host memory whatever device their inputs are on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kiln.errors import UnsupportedOpError

DEFAULT_DOMAIN = ""
_DOMAIN_ALIASES = {"ai.onnx": DEFAULT_DOMAIN}


class Subgraph(Protocol):
    """A graph attribute (If branches, Loop/Scan bodies), callable with its inputs in order."""

    input_names: Sequence[str]
    output_names: Sequence[str]

    def __call__(self, *inputs: Any) -> list[Any]: ...


@dataclass(frozen=True)
class OpImpl:
    domain: str
    op_type: str
    since: int
    fn: Callable[..., Any]
    wants: frozenset[str]  # which of the caller-filled keyword parameters fn declares
    host_inputs: frozenset[int] = frozenset()
    metadata_only: bool = False

    def bind(
        self,
        attributes: dict[str, Any],
        device: Any,
        num_outputs: int,
        input_types: Sequence[int] = (),
        output_types: Sequence[int] = (),
    ) -> dict[str, Any]:
        """``attributes`` plus the caller-filled parameters this implementation declares."""
        provided = {
            "_device": device,
            "_num_outputs": num_outputs,
            "_input_types": tuple(input_types),
            "_output_types": tuple(output_types),
        }
        return {**attributes, **{k: v for k, v in provided.items() if k in self.wants}}

    def __call__(self, inputs: Sequence[Any], bound_attributes: dict[str, Any]) -> Any:
        return self.fn(*inputs, **bound_attributes)


_REGISTRY: dict[tuple[str, str], list[OpImpl]] = {}
CALLER_FILLED = frozenset({"_device", "_num_outputs", "_input_types", "_output_types"})


def normalize_domain(domain: str | None) -> str:
    domain = domain or DEFAULT_DOMAIN
    return _DOMAIN_ALIASES.get(domain, domain)


def register(
    op_type: str,
    *,
    since: int = 1,
    domain: str = DEFAULT_DOMAIN,
    replace: bool = False,
    host_inputs: Sequence[int] = (),
    metadata_only: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` for ``op_type`` from opset ``since`` until the next registration's ``since``.

    ``replace`` lets a registration of the same opset take the place of the earlier one (custom
    ops, whose notebook cells are re-run); without it a second registration is a mistake.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        parameters = inspect.signature(fn).parameters
        impl = OpImpl(
            domain=normalize_domain(domain),
            op_type=op_type,
            since=since,
            fn=fn,
            wants=frozenset(parameters) & CALLER_FILLED,
            host_inputs=frozenset(host_inputs),
            metadata_only=metadata_only,
        )
        versions = _REGISTRY.setdefault((impl.domain, op_type), [])
        if any(v.since == since for v in versions):
            if not replace:
                raise ValueError(f"{domain or 'ai.onnx'}::{op_type} opset {since} registered twice")
            versions[:] = [v for v in versions if v.since != since]
        versions.append(impl)
        versions.sort(key=lambda v: v.since)
        return fn

    return decorate


def supported_opsets(op_type: str, domain: str = DEFAULT_DOMAIN) -> list[int]:
    """The first opset of each registered version of an op (empty when unknown)."""
    return [v.since for v in _REGISTRY.get((normalize_domain(domain), op_type), [])]


def lookup(op_type: str, opset: int, domain: str = DEFAULT_DOMAIN, node_name: str = "") -> OpImpl:
    """The implementation of ``op_type`` in force at ``opset`` of its domain."""
    domain = normalize_domain(domain)
    versions = _REGISTRY.get((domain, op_type), [])
    for impl in reversed(versions):
        if impl.since <= opset:
            return impl
    where = f"node {node_name!r}: " if node_name else ""
    shown = f"{domain or 'ai.onnx'}::{op_type}"
    if not versions:
        raise UnsupportedOpError(
            f"{where}operator {shown} (opset {opset}) is not implemented by kiln; replace it in "
            "the model with operators kiln implements, or give it a Python implementation with "
            f"@kiln.custom_op({domain!r}, {op_type!r}), registered in the process that builds "
            "and in every process that loads the engine"
        )
    raise UnsupportedOpError(
        f"{where}operator {shown} at opset {opset} is not implemented by kiln; "
        f"kiln implements it from opset {versions[0].since} (versions starting at "
        f"{', '.join(str(v.since) for v in versions)}); convert the model to a newer opset"
    )


def registered_ops() -> list[tuple[str, str, int]]:
    return sorted((d, op, v.since) for (d, op), vs in _REGISTRY.items() for v in vs)
