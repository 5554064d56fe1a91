"""The launch side of choices: turn a stored recipe back into a callable, without compiling."""

from __future__ import annotations

from typing import Any

from kiln.errors import EngineFormatError
from kiln.kernels.catalog import BY_ID, FALLBACK
from kiln.kernels.choice import Launch
from kiln.ops.registry import lookup, normalize_domain


def launcher(recipe: dict[str, Any], op_type: str, domain: str, opset: int, step: str) -> Launch:
    """The callable that runs a step stored with ``recipe``."""
    reference = lookup(op_type, opset, domain, step)
    choice = BY_ID.get(recipe.get("choice"))
    if choice is None or (choice is not FALLBACK and (normalize_domain(domain), op_type) not in choice.op_types):
        raise EngineFormatError(
            f"step {step!r} ({op_type}) uses kernel choice {recipe.get('choice')!r}, which this "
            "kiln does not know for that op; rebuild the engine with this version of kiln"
        )
    return choice.launch(recipe, reference)
