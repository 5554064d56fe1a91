"""Errors kiln raises for problems a user can fix.

Every message names the file, node, op or tensor concerned and says what to do. The CLI prints
``str(error)`` on one line and exits 1.
"""


class KilnError(Exception):
    """Base of every error kiln raises on purpose."""


class ModelError(KilnError):
    """The model file or object is not a valid ONNX model kiln can read."""


class UnsupportedOpError(ModelError):
    """The model uses an operator (or an opset of it) that kiln does not implement."""


class ShapeError(KilnError):
    """Shapes in the model contradict each other."""


class InputError(KilnError):
    """Inputs given to an engine do not match its signature (names, dtypes, shapes)."""


class EngineFormatError(KilnError):
    """An engine file is unreadable: truncated, altered or of an unknown format version."""


class EngineCompatibilityError(KilnError):
    """An engine file is valid but was built for another device or incompatible libraries."""


class BuildError(KilnError):
    """The build could not complete with the given configuration."""


class ConfigError(BuildError):
    """A build option has an invalid value."""
