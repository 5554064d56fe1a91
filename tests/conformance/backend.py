"""kiln as an ``onnx.backend`` backend: every case is built, serialized, reloaded and run."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx.backend.base import Backend, BackendRep

import kiln
from kiln.runtime import from_bytes

DEVICES = {"CPU": "cpu", "CUDA": "cuda"}


class KilnRep(BackendRep):
    def __init__(self, engine: kiln.Engine) -> None:
        self.engine = engine

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if not isinstance(inputs, dict):
            inputs = {info.name: value for info, value in zip(self.engine.inputs, inputs)}
        return tuple(self.engine.run(inputs).values())


class KilnBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        kind = device.split(":")[0]
        return kind == "CPU" or (kind == "CUDA" and torch.cuda.is_available())

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        target = DEVICES[device.split(":")[0]]
        engine = kiln.build(model, device=target)
        return KilnRep(from_bytes(engine.to_bytes(), device=target))
