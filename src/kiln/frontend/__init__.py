"""Model importers: each turns a user's model into kiln's graph IR (onnx_ir)."""

from kiln.frontend.onnx import load_onnx, read_onnx

__all__ = ["load_onnx", "read_onnx"]
