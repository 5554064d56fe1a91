"""KernelSpec: what one kernel group computes, as frozen, hashable, JSON-serialisable data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ValueType:
    """The type of a graph value: a tensor, or a sequence/optional of tensors.

    ``dtype`` is the ONNX element type enum (0 when unknown); ``shape`` holds ints for static
    dimensions, strings for symbolic ones and ``None`` for unknown ones, or is ``None`` when even
    the rank is unknown.
    """

    kind: str  # "tensor" | "sequence" | "optional"
    dtype: int
    shape: tuple[int | str | None, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValueType:
        shape = data["shape"]
        return cls(data["kind"], data["dtype"], None if shape is None else tuple(shape))


@dataclass(frozen=True)
class KernelSpec:
    """One kernel group: its op (an ONNX or kiln-domain op), opset, attributes and value types.

    Attributes are encoded as in the engine file: ``{"int": 1}``, ``{"floats": [...]}``,
    ``{"tensor": weight_key}``; graph attributes are not part of the spec (the plan holds them).
    """

    op_type: str
    domain: str
    opset: int
    attributes: str  # canonical JSON, so the spec stays hashable
    input_types: tuple[ValueType | None, ...]
    output_types: tuple[ValueType | None, ...]

    @classmethod
    def create(
        cls,
        op_type: str,
        domain: str,
        opset: int,
        attributes: dict[str, Any],
        input_types: tuple[ValueType | None, ...],
        output_types: tuple[ValueType | None, ...],
    ) -> KernelSpec:
        canonical = json.dumps(attributes, sort_keys=True, separators=(",", ":"))
        return cls(op_type, domain, opset, canonical, input_types, output_types)

    def to_json(self) -> dict[str, Any]:
        return {
            "op_type": self.op_type,
            "domain": self.domain,
            "opset": self.opset,
            "attributes": json.loads(self.attributes),
            "input_types": [t and t.to_json() for t in self.input_types],
            "output_types": [t and t.to_json() for t in self.output_types],
        }
