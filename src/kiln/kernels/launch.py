"""The launch side of choices: turn a stored recipe back into a callable, without compiling."""

from __future__ import annotations

from typing import Any

from kiln.errors import EngineFormatError
from kiln.ops.registry import OpImpl, lookup


def launcher(recipe: dict[str, Any], op_type: str, domain: str, opset: int, step: str) -> OpImpl:
    """The callable that runs a step stored with ``recipe``."""
    choice = recipe.get("choice")
    if choice == "ops":
        return lookup(op_type, opset, domain, step)
    raise EngineFormatError(
        f"step {step!r} uses kernel choice {choice!r}, which this kiln does not know; "
        "rebuild the engine with this version of kiln"
    )
