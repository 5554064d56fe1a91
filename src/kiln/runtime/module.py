"""CompiledModule: a kiln engine behind the calling convention of the PyTorch module it came from.

:func:`kiln.compile` makes one; :func:`load_module` loads a saved one without the compiler. The
call structure (parameters, nesting, constants, output structure) is kept in the engine's
manifest under ``pytorch_call``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kiln.engine import format as engine_format
from kiln.errors import EngineFormatError, ModelError
from kiln.runtime.engine import Engine
from kiln.torch_io import CallStructure

CALL_KEY = "pytorch_call"


class CompiledModule(torch.nn.Module):
    """Called like the original module — the same arguments, the same output structure — and
    runs a kiln engine on the engine's device. Inference only: outputs carry no autograd history.
    """

    def __init__(self, engine: Engine, call: CallStructure) -> None:
        super().__init__()
        self.engine = engine
        self.call = call
        self._engine_inputs = {info.name for info in engine.inputs}
        self._output_count = call.out_spec.num_leaves

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.call.inputs.tensors(args, kwargs)
        # By name: an exporter may drop an input the model never reads.
        feed = {
            name: tensor for name, tensor in zip(self.call.inputs.tensor_names, tensors)
            if name in self._engine_inputs
        }
        outputs = self.engine.run(feed)
        # Debug builds append every layer's outputs after the module's own.
        values = list(outputs.values())[: self._output_count]
        # With no tensor inputs the engine answers in NumPy, as for NumPy inputs.
        device = self.engine.device
        return self.call.outputs(
            [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device) for v in values]
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the engine with its call structure; :func:`load_module` reads it back."""
        if CALL_KEY not in self.engine.manifest:
            raise ModelError(
                "cannot save this module: its inputs or outputs nest tensors in a container type "
                "pytree cannot serialize by name; use tuples, lists or dicts, or "
                "register the type with torch.utils._pytree.register_pytree_node(..., "
                "serialized_type_name=...)"
            )
        self.engine.save(path)

    def extra_repr(self) -> str:
        return repr(self.engine)


def load_module(path: str | os.PathLike, device: str | None = None) -> CompiledModule:
    """Load a file written by :meth:`CompiledModule.save`; ``device`` defaults to its build's."""
    data = engine_format.load(path)
    entry = data.manifest.get(CALL_KEY)
    if entry is None:
        raise EngineFormatError(
            f"{path}: a kiln engine, but not a compiled PyTorch module; load it with kiln.load"
        )
    call = CallStructure.from_json(entry, str(path))
    return CompiledModule(Engine(data, device, source=str(path)), call)
