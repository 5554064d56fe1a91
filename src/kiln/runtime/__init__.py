"""Load and run engines. Imports only the engine file format, kernel launchers and ops."""

from kiln.runtime.engine import Engine, from_bytes, load
from kiln.runtime.io import TensorInfo
from kiln.runtime.timing import Timeline

__all__ = ["Engine", "TensorInfo", "Timeline", "from_bytes", "load"]
