"""What every kiln pass is: a named step over an onnx_ir model that reports what it changed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass
class PassOutcome:
    """The model after a pass and, per rule or kind of change, how many times it applied."""

    model: ir.Model
    changes: Counter = field(default_factory=Counter)


class GraphPass(ABC):
    """A kiln pass. ``changes`` counts what it did, keyed by rule name (empty when nothing)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def __call__(self, model: ir.Model) -> PassOutcome: ...


class IrPass(GraphPass):
    """An onnx_ir pass, reported as one change when it modified the model."""

    def __init__(self, inner: ir.passes.PassBase) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    def __call__(self, model: ir.Model) -> PassOutcome:
        result = self.inner(model)
        return PassOutcome(result.model, Counter({"modified": 1} if result.modified else {}))
