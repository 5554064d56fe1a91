"""Implementations of kernel specs: one list of choices per op, the ``ops`` fallback always in it.

A choice's build side (:mod:`kiln.kernels.choice`, :mod:`kiln.kernels.catalog`) reads specs; its
launch side (:mod:`kiln.kernels.launch`) is all a deployed engine needs.
"""
