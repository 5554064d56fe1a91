"""Backends that run a model on NumPy inputs, for side-by-side benchmarks and comparisons.

Every runner takes and returns NumPy arrays by name, so each is timed end to end the same way
(host to device, compute, device to host) and compared on the same inputs.
"""

from __future__ import annotations

import threading
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch

import kiln
from kiln.errors import InputError, ModelError
from kiln.runtime import Timeline
from kiln.kernels.arithmetic import strict_fp32
from kiln.runtime.timing import RUN_START

PEERS = ("onnxruntime", "torch", "torch-compile")
# A peer's run is one span: its copies to and from the device cannot be told apart from it.
PEER_RUN = "run"


class Runner(Protocol):
    name: str

    def infer(self, feed: Mapping[str, Any], timeline: Timeline | None = None) -> dict[str, Any]:
        """Outputs by name; with ``timeline``, marks the run's start and end (or its phases)."""


class KilnRunner:
    name = "kiln"

    def __init__(self, engine: kiln.Engine) -> None:
        self.engine = engine
        self._local = threading.local()  # one execution context per thread (stream)

    def infer(self, feed: Mapping[str, Any], timeline: Timeline | None = None) -> dict[str, Any]:
        if threading.current_thread() is threading.main_thread():
            return self.engine.run(feed, timeline)
        if not hasattr(self._local, "context"):
            self._local.context = self.engine.create_context()
        return self._local.context.run(feed, timeline)


class OnnxRuntimeRunner:
    name = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, device: str, intermediate_outputs: bool = False):
        try:
            import onnxruntime
        except ImportError:
            raise InputError(
                "--vs onnxruntime needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu)"
            ) from None
        if intermediate_outputs:
            model = with_intermediate_outputs(model)
        available = onnxruntime.get_available_providers()
        wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        # Without onnxruntime-gpu, a cuda comparison still runs, on ONNX Runtime's CPU provider.
        self.provider = wanted if wanted in available else "CPUExecutionProvider"
        try:
            self.session = onnxruntime.InferenceSession(
                model.SerializeToString(), providers=[self.provider]
            )
        except Exception as error:  # onnxruntime raises its own unrelated exception types
            raise ModelError(f"ONNX Runtime cannot load the model: {error}".splitlines()[0]) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: Mapping[str, Any], timeline: Timeline | None = None) -> dict[str, Any]:
        ort_feed = {name: _numpy(feed[name]) for name in self.input_names}
        if timeline is not None:
            timeline.mark(RUN_START)
        values = self.session.run(None, ort_feed)
        if timeline is not None:
            timeline.mark(PEER_RUN)
        return dict(zip(self.output_names, values))


class TorchRunner:
    """A PyTorch module called with the model's inputs positionally, in the model's input order.

    With ``compiled``, the module runs through ``torch.compile`` in its best mode for the device:
    ``reduce-overhead`` (CUDA graphs) on cuda, ``default`` on cpu. It computes in ``dtype``: the
    engine's float type (fp16 for an fp16 engine), else strict fp32 (no TF32), like kiln, so that
    both are timed and compared doing the same arithmetic. Inputs given as device tensors are used
    as they are and outputs are left on the device (``kiln bench --no-data-transfers``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: str,
        input_names: list[str],
        output_names: list[str],
        compiled: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name = "torch-compile" if compiled else "torch"
        self.device = torch.device(device)
        self.input_names = input_names
        self.output_names = output_names
        self.dtype = dtype
        module = module.eval().to(self.device, dtype)
        self.module = torch.compile(
            module, mode="reduce-overhead" if self.device.type == "cuda" else "default"
        ) if compiled else module

    def infer(self, feed: Mapping[str, Any], timeline: Timeline | None = None) -> dict[str, Any]:
        if timeline is not None:
            timeline.mark(RUN_START)
        on_device = all(isinstance(feed[name], torch.Tensor) for name in self.input_names)
        with torch.inference_mode(), strict_fp32():
            args = [self._argument(feed[name]) for name in self.input_names]
            outputs = _flatten(self.module(*args))
            values = outputs if on_device else [v.detach().float().cpu().numpy() for v in outputs]
        if timeline is not None:
            timeline.mark(PEER_RUN)
        if len(values) != len(self.output_names):
            raise InputError(
                f"the torch module returned {len(values)} tensors, the model has "
                f"{len(self.output_names)} outputs ({', '.join(self.output_names)})"
            )
        return dict(zip(self.output_names, values))


    def _argument(self, value: Any) -> torch.Tensor:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        tensor = tensor.to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def _numpy(value: Any) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else value


def _flatten(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Mapping):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [tensor for item in result for tensor in _flatten(item)]
    raise InputError(f"the torch module returned a {type(result).__name__}, not tensors")


def load_torch_module(spec: str) -> torch.nn.Module:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> ``factory()``."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise InputError(f"--torch-module takes module.path:factory, not {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.is_file():
                raise InputError(f"--torch-module: no such file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            # registered first, as an import would: dataclasses and pickling look modules up there
            sys.modules[loader_spec.name] = module
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # let a module beside the user's model import
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"--torch-module: cannot import {module_name}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"--torch-module: {module_name} has no callable {attribute!r}")
    made = factory()
    if not isinstance(made, torch.nn.Module):
        raise InputError(
            f"--torch-module: {spec} returned a {type(made).__name__}, not a torch.nn.Module"
        )
    return made


def with_intermediate_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose top-level node outputs are all graph outputs as well.

    Types come from ONNX shape inference where it finds them; ONNX Runtime accepts the others
    untyped.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy).graph.value_info
    except Exception:  # inference is a nicety here: untyped outputs run as well
        inferred = []
    typed = {info.name: info for info in inferred}
    exposed = {output.name for output in copy.graph.output}
    for node in copy.graph.node:
        for name in node.output:
            if name and name not in exposed:
                copy.graph.output.append(typed.get(name) or onnx.ValueInfoProto(name=name))
                exposed.add(name)
    return copy
