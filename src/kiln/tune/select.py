"""Pick one choice per spec.

Candidates come ordered by preference, the ``ops`` fallback last; with nothing to time, the first
candidate that supports the spec wins.
"""

from __future__ import annotations

from kiln.kernels.choice import Choice, choices_for
from kiln.lowering.spec import KernelSpec


def select_choice(spec: KernelSpec, device: str) -> Choice:
    return choices_for(spec, device)[0]
