"""Choices: the candidate implementations of a :class:`~kiln.lowering.KernelSpec`.

A choice has two sides. The build side (``supports``, ``recipe``) reads a spec; the launch side
(``launch``) turns a stored recipe back into a callable, compiling nothing, and is all a deployed
engine runs. Every choice computes what the op's ``ops`` implementation computes; they differ in
speed only, which tuning measures.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec


HALF_TYPES = (10, 16)  # ONNX FLOAT16, BFLOAT16
FLOAT_TYPES = (1, *HALF_TYPES)  # and FLOAT: the types tensor-core library kernels take


@dataclass(frozen=True)
class Launch:
    """A step's callable, and how it wants the weights among its inputs laid out.

    ``prepare_weights`` maps an input index to a function applied once, when the engine loads, to
    a weight read at that index (a layout change only: the values stay the same).
    """

    impl: OpImpl
    prepare_weights: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = field(
        default_factory=dict
    )


class Choice(ABC):
    """One way to run the specs of the ops in ``op_types`` (``id`` names it in engine files)."""

    id: ClassVar[str]
    op_types: ClassVar[tuple[tuple[str, str], ...]]  # (domain, op type)
    # Fast for some shapes only: taken when timing says so, never as the untimed default.
    timed_only: ClassVar[bool] = False
    # 4-D inputs this choice reads channels-last: what it gets inside a conv stack, once the first
    # convolution of the stack converted its input, so tuning times it on such inputs.
    channels_last_inputs: ClassVar[tuple[int, ...]] = ()

    @abstractmethod
    def supports(self, spec: KernelSpec, device: str) -> bool: ...

    def recipe(self, spec: KernelSpec) -> dict[str, Any]:
        return {"choice": self.id}

    @abstractmethod
    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        """The callable for a step stored with ``recipe``; ``reference`` is the op's ``ops``
        implementation (whose signature and caller-filled parameters the launch keeps)."""


class OpsChoice(Choice):
    """The operator library's PyTorch function: correct for every spec, on every device."""

    id = "ops"
    op_types = ()

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return True

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        return Launch(reference)


def attributes_of(spec: KernelSpec) -> dict[str, Any]:
    """A spec's plain attribute values by name (tensor attributes as their keys)."""
    return {name: next(iter(encoded.values())) for name, encoded in json.loads(spec.attributes).items()}


def input_dtypes(spec: KernelSpec) -> list[int | None]:
    return [t.dtype if t is not None else None for t in spec.input_types]


def input_ranks(spec: KernelSpec) -> list[int | None]:
    return [
        len(t.shape) if t is not None and t.shape is not None else None for t in spec.input_types
    ]


def with_fn(reference: OpImpl, fn: Callable[..., Any]) -> OpImpl:
    """``reference`` running ``fn`` instead (same caller-filled parameters)."""
    return dataclasses.replace(reference, fn=fn)
