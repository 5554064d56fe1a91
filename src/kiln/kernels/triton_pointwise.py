"""``kiln::Pointwise`` as one generated Triton kernel (:mod:`kiln.kernels.triton_codegen`).

The recipe holds the kernel's source and what launching it needs. Loading writes the source to a
per-user cache directory, named by its hash, and imports it (``@triton.jit`` reads a function's
source from its file); Triton compiles it on the first call, once per operand layout.

Each call broadcasts the operands to the output shape and collapses that shape, host-side only:
iteration follows the memory order of the first full-size operand (so channels-last inputs give
channels-last outputs, read and written in order), and dimensions contiguous for every operand
merge. No synchronisation and no allocation but the outputs: after a first call, the launch can
be captured in a CUDA graph. A shape that still has more than ``MAX_RANK`` dimensions runs the
body op by op.

Not ``timed_only``: one kernel instead of one per op wins wherever the group has two ops (on an
H100 under CUDA graphs, from 1.2x for 64x256 to 6x for fp16 8192x4096). The tuner has no body
to run the ``ops`` reference with (a spec carries the body as data, not as a callable), so it
times this choice alone; the tests hold it to the reference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.errors import KilnError
from kiln.kernels.choice import Choice, Launch, with_fn
from kiln.kernels.triton_codegen import (
    KERNEL_NAME, MAX_RANK, SAME_LAYOUT, SCALAR, STRIDED, UnsupportedBody, decode_constant, generate,
)
from kiln.ops.activation import KILN
from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

_INT32_LIMIT = 2**31 - 1
_MAX_PLANS = 64


class GeneratedKernelError(KilnError):
    """A generated kernel could not be loaded, compiled or launched on this machine."""


def _program(spec: KernelSpec) -> dict[str, Any] | None:
    encoded = json.loads(spec.attributes).get("body", {})
    return encoded.get("pointwise") if isinstance(encoded, dict) else None


@functools.lru_cache(maxsize=256)
def _generated(program_json: str):
    try:
        return generate(json.loads(program_json))
    except UnsupportedBody:
        return None


class TritonPointwiseChoice(Choice):
    id = "triton-pointwise"
    op_types = ((KILN, "Pointwise"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        program = _program(spec)
        if device != "cuda" or program is None:
            return False
        declared = [entry["dtype"] for entry in program["inputs"]]
        if declared != [t.dtype if t is not None else None for t in spec.input_types]:
            return False  # the body's inputs must be the node's, in type too
        return _generated(json.dumps(program, sort_keys=True)) is not None

    def recipe(self, spec: KernelSpec) -> dict[str, Any]:
        program = _program(spec)
        kernel = _generated(json.dumps(program, sort_keys=True))
        if kernel is None:
            raise GeneratedKernelError(f"{spec.op_type} body has no generated kernel; it runs as ops")
        return {
            "choice": self.id,
            "source": kernel.source,
            "num_operands": kernel.num_operands,
            "used_operands": list(kernel.used_operands),
            "output_types": list(kernel.output_types),
            # constants of more than one element are passed as tensors, after the inputs
            "constants": [c for c in program["constants"] if math.prod(c["shape"]) != 1],
        }

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        return Launch(with_fn(reference, PointwiseLauncher(recipe, load_kernel(recipe["source"]))))


def cache_directory() -> Path:
    """Where generated sources are written: one directory per user, as Inductor keeps its own."""
    return Path(tempfile.gettempdir()) / f"kiln-{os.getuid()}" / "triton-pointwise"


@functools.lru_cache(maxsize=None)
def load_kernel(source: str) -> Any:
    """The ``@triton.jit`` function of a generated source (written once, imported once)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:32]
    name = f"kiln_pointwise_{digest}"
    path = cache_directory() / f"{name}.py"
    try:
        if not path.exists() or path.read_text() != source:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(source)
            os.replace(partial, path)  # readers never see half a file
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return getattr(module, KERNEL_NAME)
    except Exception as error:  # noqa: BLE001  (no Triton, unwritable cache, bad source: one message)
        raise GeneratedKernelError(
            f"cannot load the generated pointwise kernel {path}: {type(error).__name__}: {error}. "
            "Check that Triton is installed and the directory is writable, or rebuild the engine "
            "with opt_level below 3"
        ) from error


class PointwiseLauncher:
    """Runs one generated kernel with the reference's signature (inputs, then ``body``)."""

    def __init__(self, recipe: Mapping[str, Any], kernel: Any) -> None:
        self.kernel = kernel
        self.used = recipe["used_operands"]
        self.output_dtypes = [torch_dtype(t) for t in recipe["output_types"]]
        self.constant_entries = recipe["constants"]
        self.num_inputs = recipe["num_operands"] - len(self.constant_entries)
        self.constants: dict[torch.device, list[torch.Tensor]] = {}
        self.plans: dict[tuple, _LaunchPlan] = {}  # by the used operands' shapes and strides

    def __call__(self, *inputs: torch.Tensor, body: Any = None) -> tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_inputs:
            raise GeneratedKernelError(
                f"pointwise kernel takes {self.num_inputs} inputs, got {len(inputs)}; the engine "
                "file does not match its plan, rebuild it"
            )
        device = inputs[0].device
        operands = [*inputs, *self._constants_on(device)]
        used = [operands[k] for k in self.used]
        signature = tuple((x.shape, x.stride()) for x in used)
        plan = self.plans.get(signature)
        if plan is None:
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            plan = self.plans[signature] = _LaunchPlan(_Layout(used), self.used, len(operands))
        outputs = [plan.layout.empty(dtype, device) for dtype in self.output_dtypes]
        if plan.layout.numel == 0:
            return tuple(outputs)
        if plan.arguments is None:
            if not callable(body):
                raise GeneratedKernelError(f"pointwise kernel: shape {list(plan.layout.shape)} has more "
                                           f"than {MAX_RANK} dimensions that do not merge")
            return tuple(body(*inputs))
        try:
            self.kernel[plan.grid](*operands, *outputs, *plan.arguments, **plan.options)
        except Exception as error:  # noqa: BLE001  (Triton's compile and launch errors vary by version)
            raise GeneratedKernelError(
                f"generated pointwise kernel failed for shape {list(plan.layout.shape)}: "
                f"{type(error).__name__}: {error}. Rebuild the engine with opt_level below 3 to run "
                "this layer op by op"
            ) from error
        return tuple(outputs)

    def _constants_on(self, device: torch.device) -> list[torch.Tensor]:
        """The tensor constants on ``device``, made on the first call (before any capture)."""
        if device not in self.constants:
            self.constants[device] = [
                torch.from_numpy(decode_constant(entry).copy()).to(device=device, dtype=torch_dtype(entry["dtype"]))
                for entry in self.constant_entries
            ]
        return self.constants[device]


class _LaunchPlan:
    """Everything a launch passes besides the tensors, for one signature of operand layouts:
    ``arguments`` (numel, sizes, strides) is None where the shape keeps too many dimensions."""

    def __init__(self, layout: _Layout, used: Sequence[int], num_operands: int) -> None:
        self.layout = layout
        self.arguments: list[int] | None = None
        if len(layout.sizes) > MAX_RANK:
            return
        sizes = [1] * (MAX_RANK - len(layout.sizes)) + layout.sizes
        strides, modes = [0] * (MAX_RANK * num_operands), [STRIDED] * num_operands
        contiguous = _contiguous_strides(layout.sizes)
        for k, operand_strides in zip(used, layout.strides):
            strides[k * MAX_RANK:(k + 1) * MAX_RANK] = [0] * (MAX_RANK - len(operand_strides)) + operand_strides
            modes[k] = SCALAR if not any(operand_strides) else SAME_LAYOUT if operand_strides == contiguous \
                else STRIDED
        block, warps = _block_and_warps(layout.numel)
        self.arguments = [layout.numel, *sizes, *strides]
        self.grid = (-(-layout.numel // block),)
        self.options = {
            "BLOCK": block, "num_warps": warps,
            "WIDE": layout.numel + block > _INT32_LIMIT or layout.max_offset > _INT32_LIMIT,
            **{f"MODE{k}": mode for k, mode in enumerate(modes)},
        }


def _block_and_warps(numel: int) -> tuple[int, int]:
    """Enough elements per program to keep loads wide, fewer programs for small tensors."""
    block = min(1024, max(128, 1 << (numel - 1).bit_length()))
    return block, max(1, min(4, block // 256))


def _contiguous_strides(sizes: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return strides[::-1]


class _Layout:
    """The output shape collapsed for iteration: ``sizes`` (outermost first), each operand's
    ``strides`` along them, and the outputs' memory order."""

    def __init__(self, operands: Sequence[torch.Tensor]):
        shapes, strides = [x.shape for x in operands], [x.stride() for x in operands]
        shape = torch.broadcast_shapes(*shapes)
        rank = len(shape)
        self.shape, self.numel = shape, math.prod(shape)
        aligned = [
            [0] * (rank - len(s)) + [st if size != 1 else 0 for size, st in zip(s, t)]
            for s, t in zip(shapes, strides)
        ]
        # Follow the memory order of the first operand that covers the whole shape.
        lead = next((a for s, a in zip(shapes, aligned) if tuple(s) == tuple(shape)), None)
        order = list(range(rank))
        if lead is not None:
            order.sort(key=lambda d: -lead[d])
        self.order = order
        sizes, operand_strides = [], [[] for _ in aligned]
        for d in order:
            if shape[d] == 1:
                continue
            if sizes and all(s[-1] == a[d] * shape[d] for s, a in zip(operand_strides, aligned)):
                sizes[-1] *= shape[d]  # contiguous with the previous dimension for every operand
                for s, a in zip(operand_strides, aligned):
                    s[-1] = a[d]
                continue
            sizes.append(shape[d])
            for s, a in zip(operand_strides, aligned):
                s.append(a[d])
        self.sizes, self.strides = sizes, operand_strides
        self.max_offset = max(
            (sum((n - 1) * st for n, st in zip(sizes, s)) for s in operand_strides), default=0
        )

    def empty(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An output laid out in the iteration order (its memory is walked contiguously)."""
        permuted = torch.empty([self.shape[d] for d in self.order], dtype=dtype, device=device)
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        return permuted.permute(inverse)

