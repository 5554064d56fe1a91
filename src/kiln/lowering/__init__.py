"""Lowering: the optimized graph becomes kernel groups, each described by a :class:`KernelSpec`."""

from kiln.lowering.lower import LoweredGraph, LoweredModel, Step, lower
from kiln.lowering.spec import KernelSpec, ValueType

__all__ = ["KernelSpec", "LoweredGraph", "LoweredModel", "Step", "ValueType", "lower"]
