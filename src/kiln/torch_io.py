"""A PyTorch module's call, flattened to the tensors an engine takes and gives, and back.

Exporters and engines see flat lists of tensors; users call a module with tensors nested in
tuples, lists and dicts, by position or keyword, with Python constants among them, and expect
back whatever the module returns. :class:`CallStructure` records that shape from one example
call, checks later calls against it, and travels in an engine's manifest as JSON (pytree's
treespec serialization; never pickle). Both the frontend and the runtime use it, so it sits
outside the stages.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from kiln.errors import EngineFormatError, InputError, ModelError

CONSTANT_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class InputStructure:
    """The arguments of an example call: which parameters, nested how, with which constants.

    parameters: every ``forward`` parameter as (name, kind name of ``inspect.Parameter``).
    arguments: the parameters the example passed; a call must pass exactly these.
    in_spec: the pytree structure of the passed arguments (a dict of name to value).
    leaf_names: one name per leaf: the parameter, then the path into it (``pair_0``); the
        tensor leaves' names are the exported model's input names.
    constants: per leaf, the Python value the example passed, or None where a tensor goes.
        Exporters bake Python values into the model, so a call must pass the same ones.
    """

    parameters: tuple[tuple[str, str], ...]
    arguments: tuple[str, ...]
    in_spec: pytree.TreeSpec
    leaf_names: tuple[str, ...]
    constants: tuple[Any, ...]

    @classmethod
    def of_example(
        cls, forward: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> InputStructure:
        signature = inspect.signature(forward)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise ModelError(
                f"the example inputs do not fit the module's forward{signature}: {error}"
            ) from None
        paths_and_leaves, in_spec = pytree.tree_flatten_with_path(dict(bound.arguments))
        names, constants = [], []
        for path, leaf in paths_and_leaves:
            name = _leaf_name(path)
            if not isinstance(leaf, (torch.Tensor, *CONSTANT_TYPES)):
                raise ModelError(
                    f"argument {name!r} is a {type(leaf).__name__}; kiln compiles calls whose "
                    "arguments are tensors (nested in tuples, lists and dicts) and int, float, "
                    "bool or str constants"
                )
            names.append(name)
            constants.append(None if isinstance(leaf, torch.Tensor) else leaf)
        return cls(
            parameters=tuple((p.name, p.kind.name) for p in signature.parameters.values()),
            arguments=tuple(bound.arguments),
            in_spec=in_spec,
            leaf_names=tuple(names),
            constants=tuple(constants),
        )

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, c in zip(self.leaf_names, self.constants) if c is None]

    def tensors(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors of a call, in the exported model's input order, after checking the call."""
        # Every parameter gets a default so that bind() accepts any subset; which ones were
        # passed is checked against the example below, with a message naming them.
        expected = f"({', '.join(self.arguments)})"
        try:
            passed = dict(self._binding_signature.bind(*args, **kwargs).arguments)
        except TypeError as error:
            raise InputError(f"{error}; the module was compiled for a call with {expected}") from None
        if set(passed) != set(self.arguments):
            raise InputError(
                f"the call passes ({', '.join(passed)}), the module was compiled for a call with "
                f"{expected}; compile it again with example inputs for this call"
            )
        leaves, spec = pytree.tree_flatten({name: passed[name] for name in self.arguments})
        if spec != self.in_spec:
            raise InputError(
                f"the arguments are nested as {_one_line(spec)}, the module was compiled for "
                f"{_one_line(self.in_spec)}"
            )
        tensors = []
        for name, leaf, constant in zip(self.leaf_names, leaves, self.constants):
            if constant is None:
                if not isinstance(leaf, torch.Tensor):
                    raise InputError(f"argument {name!r} must be a tensor, not {type(leaf).__name__}")
                tensors.append(leaf)
            elif leaf != constant or type(leaf) is not type(constant):
                raise InputError(
                    f"argument {name!r} is {leaf!r}, but the module was compiled with {constant!r}: "
                    "Python values are baked into the engine; compile it again for this value"
                )
        return tensors

    def call_arguments(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
        """The positional and keyword arguments of the example call, with ``tensors`` in it."""
        remaining = iter(tensors)
        leaves = [next(remaining) if c is None else c for c in self.constants]
        bound = inspect.BoundArguments(
            self._signature(defaults=False), pytree.tree_unflatten(leaves, self.in_spec)
        )
        return bound.args, bound.kwargs

    @functools.cached_property
    def _binding_signature(self) -> inspect.Signature:
        return self._signature(defaults=True)  # built once: every call binds against it

    def _signature(self, defaults: bool) -> inspect.Signature:
        parameters = []
        for name, kind_name in self.parameters:
            kind = getattr(inspect.Parameter, kind_name)
            takes_default = defaults and kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD
            )
            default = None if takes_default else inspect.Parameter.empty
            parameters.append(inspect.Parameter(name, kind, default=default))
        return inspect.Signature(parameters)


@dataclass(frozen=True)
class CallStructure:
    """A module's example call and the pytree structure of what it returned (tensor leaves)."""

    inputs: InputStructure
    out_spec: pytree.TreeSpec

    def outputs(self, tensors: Sequence[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(tensors), self.out_spec)

    def to_json(self) -> dict[str, Any] | None:
        """The structure as JSON, or None for containers pytree cannot serialize by name."""
        try:
            in_spec = pytree.treespec_dumps(self.inputs.in_spec)
            out_spec = pytree.treespec_dumps(self.out_spec)
        except (NotImplementedError, TypeError):
            return None
        return {
            "parameters": [list(p) for p in self.inputs.parameters],
            "arguments": list(self.inputs.arguments),
            "in_spec": in_spec,
            "leaf_names": list(self.inputs.leaf_names),
            "constants": list(self.inputs.constants),
            "out_spec": out_spec,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any], source: str) -> CallStructure:
        try:
            inputs = InputStructure(
                parameters=tuple((name, kind) for name, kind in entry["parameters"]),
                arguments=tuple(entry["arguments"]),
                in_spec=pytree.treespec_loads(entry["in_spec"]),
                leaf_names=tuple(entry["leaf_names"]),
                constants=tuple(entry["constants"]),
            )
            return cls(inputs, pytree.treespec_loads(entry["out_spec"]))
        except NotImplementedError as error:  # a container type registered by code not imported
            raise EngineFormatError(
                f"{source}: {error}; import the module that registers that type with pytree first"
            ) from None
        except (KeyError, TypeError, ValueError):
            raise EngineFormatError(
                f"{source}: the module's call structure is malformed; compile the module again"
            ) from None


def _leaf_name(path: Sequence[Any]) -> str:
    """``x`` for a tensor argument, ``pair_0`` / ``batch_mask`` for tensors nested in one."""
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return "_".join(parts)


def _one_line(spec: pytree.TreeSpec) -> str:
    return " ".join(str(spec).split())
