"""PyTorch ``nn.Module`` -> ONNX, through ``torch.onnx.export(dynamo=True)``.

Exporters see the module through :class:`_FlatCall`: the example call's tensors in, as flat
positional inputs, and the outputs' tensors out, as a flat tuple. The structure around them
(parameters, nesting, Python constants, the output's tuple/list/dict shape) is kept in a
:class:`~kiln.torch_io.CallStructure`.

When ``torch.export`` cannot take the module, the TorchScript exporter (``dynamo=False``) is
tried, with a log warning, and its trace is refused if the tracer warns that it may not
generalize (a Python branch on a tensor's value, for example). When neither works, the
:class:`~kiln.errors.ModelError` names the operator or the line of Python the exporter stopped at
and says what to do.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from kiln.errors import ConfigError, KilnError, ModelError
from kiln.torch_io import CallStructure, InputStructure

log = logging.getLogger("kiln.frontend.torch")

MODEL_FILE = "model.onnx"
# What the exporters' messages say, as of torch 2.13; unmatched messages still yield their
# first line, only less precisely placed.
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")
_NO_TRANSLATION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_USER_FRAME = re.compile(
    r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \S+\s*\n\s*(.+)'
)

_OPERATOR_HINT = (
    "export the model yourself with torch.onnx.export(..., custom_translation_table=...) and "
    "kiln.build the ONNX file (a new ONNX op can be implemented with @kiln.custom_op), or use "
    "torch.compile(model, backend='kiln'), which runs that operator in PyTorch and the rest in kiln"
)
_CONTROL_FLOW_HINT = (
    "write the branch with torch.where or torch.cond, or use torch.compile(model, backend='kiln'), "
    "which runs the code around it in kiln"
)
_GENERIC_HINT = (
    "see https://pytorch.org/docs/stable/export.html for what torch.export supports, or use "
    "torch.compile(model, backend='kiln'), which falls back to PyTorch where export fails"
)

AxesSpec = dict[int, Any]  # axis -> a dimension name or a torch.export.Dim


@dataclass(frozen=True)
class ExportFailure:
    """Why an exporter failed, in one line, and what to do about it."""

    reason: str
    hint: str


def export_module(
    module: torch.nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
    directory: Path,
) -> tuple[Path, CallStructure]:
    """Export ``module`` called as ``module(*args, **kwargs)`` to ``directory``/model.onnx.

    ``dynamic_shapes`` is torch.export's (a dict by parameter name or a tuple in parameter order,
    mirroring each argument's nesting), with dimension names allowed in place of
    ``torch.export.Dim``: ``{"x": {0: "batch"}}``. The same name is the same dimension.
    """
    inputs = InputStructure.of_example(module.forward, args, dict(kwargs))
    tensors = inputs.tensors(args, dict(kwargs))
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    axes = _tensor_axes(bound, dynamic_shapes)
    out_specs: list[pytree.TreeSpec] = []
    flat = _FlatCall(module, inputs, out_specs.append)
    path = directory / MODEL_FILE
    name = type(module).__name__
    try:
        _export_with_dynamo(flat, tensors, inputs.tensor_names, axes, path)
    except Exception as failure:  # exporters raise many types; every one is reported below
        _reraise_kiln_error(failure)
        first = describe_failure(failure)
        try:
            _export_with_torchscript(flat, tensors, inputs.tensor_names, axes, path)
        except Exception as fallback_failure:  # as above
            _reraise_kiln_error(fallback_failure)
            second = describe_failure(fallback_failure).reason
            raise ModelError(
                f"cannot export {name} to ONNX: {first.reason} (the TorchScript exporter failed "
                f"too: {second}); {first.hint}"
            ) from failure
        log.warning(
            "torch.export could not export %s (%s); exported it with the TorchScript exporter "
            "(dynamo=False) instead", name, first.reason,
        )
    if not out_specs:
        raise ModelError(f"exporting {name} never called its forward")
    return path, CallStructure(inputs, out_specs[-1])


class _FlatCall(torch.nn.Module):
    """``module`` taking flat tensors and returning a flat tuple of tensors, as exporters want.

    Each call reports its output structure to ``on_out_spec``: a callback rather than an
    attribute, because torch.export undoes attribute writes made while it traces.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        inputs: InputStructure,
        on_out_spec: Callable[[pytree.TreeSpec], None],
    ) -> None:
        super().__init__()
        self.module = module
        self.inputs = inputs
        self.on_out_spec = on_out_spec
        self.training = module.training  # the exporters warn about (only) this module's mode

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.inputs.call_arguments(tensors)
        leaves, out_spec = pytree.tree_flatten(self.module(*args, **kwargs))
        self.on_out_spec(out_spec)
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                raise ModelError(
                    f"output {index} of {type(self.module).__name__} is a {type(leaf).__name__}; "
                    "kiln compiles modules whose outputs are tensors (nested in tuples, lists and dicts)"
                )
        return tuple(leaves)


def _export_with_dynamo(
    flat: _FlatCall, tensors: list[torch.Tensor], names: list[str], axes: list[AxesSpec], path: Path
) -> None:
    dims: dict[str, torch.export.Dim] = {}  # one Dim per name, shared by every axis that has it
    shapes = [
        {axis: dims.setdefault(d, torch.export.Dim(d)) if isinstance(d, str) else d for axis, d in a.items()}
        for a in axes
    ]
    program = torch.onnx.export(
        flat, tuple(tensors), dynamo=True, input_names=names,
        dynamic_shapes=(tuple(shapes),) if any(axes) else None,
        optimize=False,  # kiln's own passes clean the graph up
        verbose=False,
    )
    program.save(str(path))


def _export_with_torchscript(
    flat: _FlatCall, tensors: list[torch.Tensor], names: list[str], axes: list[AxesSpec], path: Path
) -> None:
    dynamic_axes = {
        name: {axis: _dim_name(d, name, axis) for axis, d in a.items()}
        for name, a in zip(names, axes) if a
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            flat, tuple(tensors), str(path), dynamo=False, input_names=names,
            dynamic_axes=dynamic_axes or None,
        )
    for warning in caught:
        if issubclass(warning.category, torch.jit.TracerWarning):
            first_sentence = str(warning.message).split(". ")[0]
            raise _UntrustedTrace(f"the tracer warns that its trace may not generalize: {first_sentence}")


class _UntrustedTrace(Exception):
    """The TorchScript tracer warned that the trace may not hold for other inputs."""


def _dim_name(dim: Any, tensor: str, axis: int) -> str:
    if isinstance(dim, str):
        return dim
    return getattr(dim, "__name__", None) or f"{tensor}_{axis}"  # a Dim, or a hint like Dim.AUTO


def _tensor_axes(
    arguments: Mapping[str, Any], dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None
) -> list[AxesSpec]:
    """Per tensor input in flattening order, its dynamic axes (empty when static)."""
    if dynamic_shapes is None:
        by_argument: Mapping[str, Any] = {}
    elif isinstance(dynamic_shapes, Mapping):
        unknown = sorted(set(dynamic_shapes) - set(arguments))
        if unknown:
            raise ConfigError(
                f"dynamic_shapes names {', '.join(map(repr, unknown))}, which the example call does "
                f"not pass; its arguments are: {', '.join(arguments)}"
            )
        by_argument = dynamic_shapes
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(arguments):
            raise ConfigError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries but the example call passes "
                f"{len(arguments)} arguments ({', '.join(arguments)}); give one entry per argument"
            )
        by_argument = dict(zip(arguments, dynamic_shapes))
    else:
        raise ConfigError(
            "dynamic_shapes must be a dict by argument name (like {'x': {0: 'batch'}}) or a tuple "
            f"with one entry per argument, not {type(dynamic_shapes).__name__}"
        )
    return [
        axes for name, value in arguments.items() for axes in _axes_of(value, by_argument.get(name), name)
    ]


def _axes_of(value: Any, spec: Any, name: str) -> list[AxesSpec]:
    if isinstance(value, torch.Tensor):
        return [_axes_of_tensor(spec, name)]
    tensor_count = sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
    if spec is None or tensor_count == 0:
        return [{} for _ in range(tensor_count)]
    if isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)) and len(value) == len(spec):
        return [a for i, (v, s) in enumerate(zip(value, spec)) for a in _axes_of(v, s, f"{name}[{i}]")]
    if isinstance(value, Mapping) and isinstance(spec, Mapping):
        return [a for key, v in value.items() for a in _axes_of(v, spec.get(key), f"{name}[{key!r}]")]
    raise ConfigError(
        f"dynamic_shapes for {name!r} must mirror the argument's nesting (tuples, lists, dicts) "
        "with one entry per tensor"
    )


def _axes_of_tensor(spec: Any, name: str) -> AxesSpec:
    if spec is None:
        return {}
    if isinstance(spec, Mapping) and all(isinstance(axis, int) for axis in spec):
        return {axis: dim for axis, dim in spec.items() if dim is not None}
    if isinstance(spec, (list, tuple)):
        return {axis: dim for axis, dim in enumerate(spec) if dim is not None}
    raise ConfigError(
        f"dynamic_shapes for tensor {name!r} must map axes to dimension names, like {{0: 'batch'}}, "
        f"not {spec!r}"
    )


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its explicit causes (not the exception being handled when it was raised)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _reraise_kiln_error(failure: BaseException) -> None:
    """A KilnError raised inside the export (from kiln's own checks) is the real message."""
    for cause in _causes(failure):
        if isinstance(cause, KilnError):
            raise cause from None


def rejected_operators(error: BaseException) -> set[str]:
    """The torch operators (``namespace.name.overload``) an export failed to translate to ONNX."""
    text = "\n".join(str(cause) for cause in _causes(error))
    return {f"{op}.{overload}" for op, overload in _NO_TRANSLATION.findall(text)}


def describe_failure(error: BaseException) -> ExportFailure:
    """The operator or the Python line an exporter stopped at, and what to do about it."""
    operators = rejected_operators(error)
    if operators:
        return ExportFailure(
            f"the ONNX exporter has no translation for operator {', '.join(sorted(operators))}",
            _OPERATOR_HINT,
        )
    causes = list(_causes(error))
    text = _ANSI_COLOR.sub("", "\n".join(str(cause) for cause in causes))
    frame = _USER_FRAME.search(text)
    where = f" at {frame.group(1)}:{frame.group(2)} (`{frame.group(3).strip()}`)" if frame else ""
    if "data-dependent" in text or "DataDependent" in text:
        return ExportFailure(
            f"torch.export cannot follow Python control flow on a tensor's value{where}",
            _CONTROL_FLOW_HINT,
        )
    innermost = _ANSI_COLOR.sub("", str(causes[-1])).strip()
    summary = innermost.splitlines()[0] if innermost else type(causes[-1]).__name__
    return ExportFailure(f"{summary}{where}", _GENERIC_HINT)
