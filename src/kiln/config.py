"""Build options: the one place they live. Nothing below this module reads environment variables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kiln.errors import ConfigError

DEVICES = ("cpu", "cuda")
OPT_LEVELS = range(0, 6)


@dataclass(frozen=True)
class BuildConfig:
    """How to build an engine.

    device: ``"cpu"`` or ``"cuda"``; ``None`` picks cuda when a GPU is visible, else cpu.
    opt_level: 0 (cleanup only) to 5; 3 is the default.
    debug_outputs: also expose every top-level layer's outputs as engine outputs, named as the
        ONNX values they replace, so ``kiln compare --layerwise`` can find the first layer that
        diverges. Costs memory: no intermediate value is released.
    """

    device: str | None = None
    opt_level: int = 3
    debug_outputs: bool = False

    def __post_init__(self) -> None:
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"opt_level must be an integer from 0 to 5, not {self.opt_level!r}")

    def replace(self, **overrides: object) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown build option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)
