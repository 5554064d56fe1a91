"""Implementations of kernel specs: one list of choices per op, the ``ops`` fallback always in it.

The compile side (:mod:`kiln.kernels.choice`) runs at build time; the launch side
(:mod:`kiln.kernels.launch`) is all a deployed engine needs.
"""
