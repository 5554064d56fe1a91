"""Optimization profiles at run time: the input shapes must fit one of the engine's profiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln.config import Profile
from kiln.errors import ConfigError, InputError


def read_profiles(manifest: Mapping[str, Any]) -> tuple[Profile, ...]:
    """The profiles an engine was built with (none for engines built without)."""
    stored = manifest.get("profiles", [])
    if not isinstance(stored, list):
        raise ValueError(f"profiles must be a list, not {type(stored).__name__}")
    try:
        return tuple(Profile.from_json(entry) for entry in stored)
    except ConfigError as error:
        raise ValueError(f"stored optimization profile: {error}") from None


def check_profiles(profiles: tuple[Profile, ...], bound: Mapping[str, Any]) -> None:
    """Raise :class:`InputError`, listing each profile's ranges, when the shapes of ``bound``
    (input name -> bound tensor) fit no profile entirely; any shapes pass without profiles."""
    if not profiles:
        return
    shapes = {name: tuple(value.shape) for name, value in bound.items() if hasattr(value, "shape")}
    if any(profile.fits(shapes) for profile in profiles):
        return
    named = dict.fromkeys(name for profile in profiles for name in profile.shapes)
    given = ", ".join(
        f"{name}[{'x'.join(map(str, shapes[name])) if name in shapes else '?'}]" for name in named
    )
    ranges = "; ".join(f"profile {index}: {profile.describe()}" for index, profile in enumerate(profiles))
    raise InputError(f"input shapes {given} fit no optimization profile of this engine: {ranges}")
