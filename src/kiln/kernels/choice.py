"""Choices: the candidate implementations of a :class:`~kiln.lowering.KernelSpec`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from kiln.lowering.spec import KernelSpec


class Choice(ABC):
    """One way to run a kernel spec. ``recipe`` is what the engine stores to launch it again."""

    id: ClassVar[str]

    @abstractmethod
    def supports(self, spec: KernelSpec, device: str) -> bool: ...

    def recipe(self, spec: KernelSpec) -> dict[str, Any]:
        return {"choice": self.id}


class OpsChoice(Choice):
    """The operator library's PyTorch function: correct for every spec, on every device."""

    id = "ops"

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return True


# Library and generated choices join these lists per op type; the fallback closes every list.
CHOICES_BY_OP: dict[str, list[Choice]] = {}
FALLBACK = OpsChoice()


def choices_for(spec: KernelSpec, device: str) -> list[Choice]:
    candidates = [c for c in CHOICES_BY_OP.get(spec.op_type, []) if c.supports(spec, device)]
    return [*candidates, FALLBACK]
