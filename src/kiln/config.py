"""Build options: the one place they live. Nothing below this module reads environment variables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kiln.errors import ConfigError

DEVICES = ("cpu", "cuda")
OPT_LEVELS = range(0, 6)
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
REDUCED_PRECISIONS = ("fp16", "bf16")
LAYER_PRECISIONS = ("fp32",)  # what a layer may be pinned to


@dataclass(frozen=True)
class BuildConfig:
    """How to build an engine.

    device: ``"cpu"`` or ``"cuda"``; ``None`` picks cuda when a GPU is visible, else cpu.
    opt_level: 0 (cleanup only) to 5; 3 is the default.
    debug_outputs: also expose every top-level layer's outputs as engine outputs, named as the
        ONNX values they replace, so ``kiln compare --layerwise`` can find the first layer that
        diverges. Costs memory: no intermediate value is released.
    precision: ``"fp32"`` (strict, the default), ``"tf32"`` (fp32 layers may use TF32 tensor
        cores), ``"fp16"`` or ``"bf16"`` (layers computing in float32 run in the reduced type,
        but for those that need fp32's range; see :mod:`kiln.passes.precision`).
    layer_precisions: layer name (as ``kiln inspect`` shows it) -> ``"fp32"``, to keep that
        layer in fp32 under a reduced policy. Unknown names fail the build.
    """

    device: str | None = None
    opt_level: int = 3
    debug_outputs: bool = False
    precision: str = "fp32"
    layer_precisions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"opt_level must be an integer from 0 to 5, not {self.opt_level!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r} "
                "(int8 and fp8 are not supported yet)"
            )
        if not isinstance(self.layer_precisions, dict):
            raise ConfigError("layer_precisions must be a dict of layer name to precision")
        for layer, precision in self.layer_precisions.items():
            if precision not in LAYER_PRECISIONS:
                raise ConfigError(
                    f"layer {layer!r} can be pinned to {', '.join(LAYER_PRECISIONS)} only, "
                    f"not {precision!r}"
                )

    def replace(self, **overrides: object) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown build option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)
