"""Graph rewrites on onnx_ir; :mod:`kiln.passes.pipeline` lists the passes of each level."""

from kiln.passes.pipeline import PassRecord, optimize

__all__ = ["PassRecord", "optimize"]
