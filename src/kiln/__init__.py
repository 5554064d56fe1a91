"""kiln: an inference optimizer and runtime for NVIDIA GPUs. ONNX in, fast engine out."""

from __future__ import annotations

from kiln import errors
from kiln.config import BuildConfig
from kiln.frontend.onnx import ModelSource
from kiln.runtime import Engine, TensorInfo, load

__all__ = ["BuildConfig", "Engine", "TensorInfo", "build", "errors", "load"]
__version__ = "0.1.0"


def build(model: ModelSource, config: BuildConfig | None = None, **overrides: object) -> Engine:
    """Build an engine from an ONNX model (a path, bytes or ``onnx.ModelProto``).

    Options come from ``config`` (a :class:`BuildConfig`) with keyword ``overrides`` on top, for
    example ``kiln.build("model.onnx", device="cpu")``.
    """
    from kiln.engine.build import build_engine  # the compiler loads only when building

    config = (config or BuildConfig()).replace(**overrides)
    return Engine(build_engine(model, config))
