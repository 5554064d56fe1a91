"""LayerNorm and RMSNorm as PyTorch's fused normalization kernels (one pass, fp32 statistics).

The ``ops`` versions spell the statistics out in several kernels (they are the reference); these
run ``torch.nn.functional.layer_norm`` / ``rms_norm`` over the trailing axis, the residual
addition first when there is one. Norms that also quantize their rows (``q_type``) are left to
the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F

from kiln.kernels.choice import (
    HALF_TYPES, Choice, Launch, attributes_of, input_dtypes, input_ranks, with_fn,
)
from kiln.ops.activation import KILN
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec


def normalizes_last_axis(spec: KernelSpec, device: str) -> bool:
    ranks, dtypes = input_ranks(spec), input_dtypes(spec)
    axis = attributes_of(spec).get("axis", -1)
    # 16-bit scale and bias must match X's type for the fused kernels
    same_type = all(d is None or d == dtypes[0] for d in dtypes[1:3])
    return (
        device == "cuda" and ranks[0] is not None and ranks[1] == 1
        and axis in (-1, ranks[0] - 1) and (dtypes[0] not in HALF_TYPES or same_type)
    )


class TorchLayerNormChoice(Choice):
    id = "torch-layer-norm"
    op_types = ((KILN, "LayerNorm"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        ranks = input_ranks(spec)
        return (normalizes_last_axis(spec, device) and (len(ranks) < 3 or ranks[2] in (None, 1))
                and not attributes_of(spec).get("q_type", 0))

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, scale, bias=None, residual=None, *, epsilon=1e-5, _num_outputs=1, **_same):
            total = x if residual is None else x + residual
            y = F.layer_norm(total, scale.shape, scale, bias, epsilon)
            return (y, total) if _num_outputs == 2 else y

        return Launch(with_fn(reference, run))


class TorchRMSNormChoice(Choice):
    id = "torch-rms-norm"
    op_types = ((KILN, "RMSNorm"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return normalizes_last_axis(spec, device) and not attributes_of(spec).get("q_type", 0)

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        def run(x, scale, residual=None, *, epsilon=1e-5, _num_outputs=1, **_same):
            total = x if residual is None else x + residual
            y = F.rms_norm(total, scale.shape, scale, epsilon)
            return (y, total) if _num_outputs == 2 else y

        return Launch(with_fn(reference, run))
