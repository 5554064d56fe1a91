"""Optimization profiles at build time: checked against the model's inputs, resolved to sizes.

A build with profiles accepts only the shapes that fit one of them, so every input with a
dimension the model leaves open (symbolic or unknown) must be in each profile. Tuning and memory
planning read the sizes of the symbolic dimensions at the first profile's ``opt`` and ``max``
shapes from :func:`profile_symbols`.
"""

from __future__ import annotations

from typing import Any

from kiln.config import BuildConfig, DeclaredShape, Profile, format_shape
from kiln.errors import ConfigError
from kiln.lowering import LoweredGraph


def input_signature(graph: LoweredGraph) -> dict[str, DeclaredShape]:
    """Each input's declared shape (ints, symbol names, None), or None where its rank is unknown."""
    return {
        name: None if vtype is None or vtype.shape is None else vtype.shape
        for name, vtype in zip(graph.inputs, graph.input_types)
    }


def check_profiles(profiles: tuple[Profile, ...], graph: LoweredGraph) -> list[dict[str, Any]]:
    """Check ``profiles`` against the graph's inputs; return them as the manifest stores them.

    Raises :class:`ConfigError` when a profile contradicts the model (see :meth:`Profile.dims`)
    or leaves out an input with a dimension the model does not fix.
    """
    signature = input_signature(graph)
    open_inputs = [
        name for name, vtype in zip(graph.inputs, graph.input_types)
        if vtype is None or vtype.kind == "tensor" and _is_open(vtype.shape)
    ]
    kinds = {name: vtype.kind for name, vtype in zip(graph.inputs, graph.input_types) if vtype}
    for index, profile in enumerate(profiles):
        for name in profile.shapes:
            if kinds.get(name, "tensor") != "tensor":
                raise ConfigError(
                    f"{_which(index, profiles)} names input {name!r}, a {kinds[name]}; profiles "
                    "give the shapes of tensor inputs only"
                )
        try:
            profile.dims(signature, "opt")
        except ConfigError as error:  # name the profile among several
            message = str(error).replace("optimization profile", _which(index, profiles), 1)
            raise ConfigError(message) from None
        for name in open_inputs:
            if name not in profile.shapes:
                raise ConfigError(
                    f"{_which(index, profiles)} does not cover input {name!r} "
                    f"({format_shape(signature[name])}), whose shape the model leaves open; give its "
                    f"min, opt and max shapes, e.g. `kiln build --shapes '{name}:MIN,OPT,MAX'` "
                    f"(shapes like 1x16) or kiln.Profile({{{name!r}: (MIN, OPT, MAX)}})"
                )
    return [profile.to_json() for profile in profiles]


def profile_symbols(config: BuildConfig, graph: LoweredGraph, which: str = "opt") -> dict[str, int]:
    """Symbol name -> size at ``which`` (``"opt"`` to tune, ``"max"`` to plan memory) of the
    first profile of ``config``, for the inputs of ``graph``; ``{}`` when there is no profile."""
    if not config.profiles:
        return {}
    return config.profiles[0].dims(input_signature(graph), which)


def _is_open(shape: DeclaredShape) -> bool:
    return shape is None or not all(isinstance(dim, int) for dim in shape)


def _which(index: int, profiles: tuple[Profile, ...]) -> str:
    return "the optimization profile" if len(profiles) == 1 else f"optimization profile {index}"
