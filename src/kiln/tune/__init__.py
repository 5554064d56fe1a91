"""Selection among the choices of each kernel spec."""

from kiln.tune.select import select_choice

__all__ = ["select_choice"]
