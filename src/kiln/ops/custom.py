"""Custom operators: ONNX nodes kiln does not know, implemented in a few lines of Python.

    import kiln, torch

    @kiln.custom_op("my.ops", "Swish", shape=lambda x, **attributes: x)
    def swish(x, *, beta=1.0):
        return x * torch.sigmoid(beta * x)

The function follows the operator library's convention (:mod:`kiln.ops.registry`): inputs
positionally, attributes as keyword arguments under their ONNX names (defaults in the signature),
one tensor back or a tuple of them; written with torch, it runs on the CPU and the GPU. ``triton``,
when given, is a callable taking the same arguments that CUDA devices use instead (one that
launches a Triton kernel, say). ``shape(*input_shapes, **attributes)`` returns the output shape,
or a list of them, for shape inference: shapes are tuples of ints and dimension names.

An engine stores a custom op by name (domain, op type, opset), never its code: the process that
builds the engine and every process that loads it register the op first. Registering the same op
again replaces it, so notebook cells can be re-run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.ops.registry import CALLER_FILLED, normalize_domain, register, supported_opsets

ShapeFunction = Callable[..., Any]

RESERVED_DOMAIN = "kiln"  # kiln's own fused ops (kiln.passes.rewrite.KILN_DOMAIN)
_CUSTOM_OPS: set[tuple[str, str]] = set()
_SHAPES: dict[tuple[str, str], ShapeFunction] = {}


def custom_op(
    domain: str,
    op_type: str,
    *,
    opset: int = 1,
    shape: ShapeFunction | None = None,
    triton: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated PyTorch function as ``domain::op_type`` from ``opset`` of its domain."""
    domain = normalize_domain(domain)
    key = (domain, op_type)
    shown = f"{domain or 'ai.onnx'}::{op_type}"
    if domain == RESERVED_DOMAIN:
        raise ConfigError(
            f"custom op {shown}: domain {RESERVED_DOMAIN!r} holds kiln's fused ops; use a domain of "
            "your own, as named in the model"
        )
    if key not in _CUSTOM_OPS and supported_opsets(op_type, domain):
        raise ConfigError(
            f"custom op {shown}: kiln already implements this operator; custom_op adds operators "
            "kiln does not know"
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        implementation = fn if triton is None else _triton_on_cuda(triton, fn)
        register(op_type, since=opset, domain=domain, replace=True)(implementation)
        _CUSTOM_OPS.add(key)
        if shape is None:
            _SHAPES.pop(key, None)
        else:
            _SHAPES[key] = shape
        return fn

    return decorate


def is_custom_op(domain: str, op_type: str) -> bool:
    return (normalize_domain(domain), op_type) in _CUSTOM_OPS


def custom_shape(domain: str, op_type: str) -> ShapeFunction | None:
    """The shape function registered with a custom op, or None."""
    return _SHAPES.get((normalize_domain(domain), op_type))


def _triton_on_cuda(triton: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """One implementation that calls ``triton`` on CUDA devices and ``fn`` everywhere else."""
    wants = {impl: frozenset(inspect.signature(impl).parameters) & CALLER_FILLED for impl in (fn, triton)}

    def dispatch(
        *inputs: Any,
        _device: Any,
        _num_outputs: int,
        _input_types: tuple[int, ...],
        _output_types: tuple[int, ...],
        **attributes: Any,
    ) -> Any:
        filled = {
            "_device": _device,
            "_num_outputs": _num_outputs,
            "_input_types": _input_types,
            "_output_types": _output_types,
        }
        chosen = triton if torch.device(_device).type == "cuda" else fn
        return chosen(*inputs, **attributes, **{name: filled[name] for name in wants[chosen]})

    return dispatch
