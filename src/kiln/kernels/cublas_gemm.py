"""cuBLAS / cuBLASLt matrix products with their epilogues, through PyTorch.

``torch.addmm`` with a 1-D bias runs cuBLASLt's bias epilogue; ``torch._addmm_activation`` adds
its ReLU or GELU epilogue, all in the GEMM kernel. cuBLASLt's GELU is the tanh approximation:
it stands in for exact (erf) GELU only in 16-bit layers, where the two differ by less than the
type's rounding (5e-4 at most, against fp16's 1e-3 step near 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels.choice import (
    FLOAT_TYPES, HALF_TYPES, Choice, Launch, attributes_of, input_dtypes, input_ranks, with_fn,
)
from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

EPILOGUE_ACTIVATIONS = {"Relu": False, "GeluTanh": True}  # activation -> use_gelu


class CublasLtGemmChoice(Choice):
    """One GEMM over the flattened leading axes, bias and ReLU/GELU in cuBLASLt's epilogue."""

    id = "cublaslt-gemm"
    op_types = ((KILN, "FusedMatMul"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        attributes = attributes_of(spec)
        ranks, dtypes = input_ranks(spec), input_dtypes(spec)
        return (
            device == "cuda"
            and dtypes[0] in FLOAT_TYPES
            and ranks[1] == 2
            and ranks[0] is not None and ranks[0] >= 2
            and not attributes.get("trans_a", 0)
            and attributes.get("alpha", 1.0) == 1.0
            and attributes.get("beta", 1.0) == 1.0
            and (len(ranks) < 3 or ranks[2] in (None, 1))
        )

    def recipe(self, spec: KernelSpec) -> dict[str, Any]:
        activation = attributes_of(spec).get("activation", "")
        if activation == "Gelu" and input_dtypes(spec)[0] in HALF_TYPES:
            activation = "GeluTanh"
        return {"choice": self.id, "epilogue": activation if activation in EPILOGUE_ACTIVATIONS else ""}

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        epilogue = recipe.get("epilogue", "")

        zero_biases: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

        def run(a, b, bias=None, residual=None, *, trans_b=0, activation="", activation_params=None,
                residual_after_activation=0, **_same_as_reference):
            weight = b.t() if trans_b else b
            rows = a.reshape(-1, a.shape[-1])
            fused = epilogue and (residual is None or residual_after_activation)
            if fused and bias is None:  # the epilogue needs a bias: zeros (folded away bias adds)
                key = (weight.shape[-1], a.dtype, a.device)
                if key not in zero_biases:
                    zero_biases[key] = torch.zeros(key[0], dtype=a.dtype, device=a.device)
                bias = zero_biases[key]
            if fused:
                y = torch._addmm_activation(bias, rows, weight, use_gelu=EPILOGUE_ACTIVATIONS[epilogue])
                activation = ""
            elif bias is not None:
                y = torch.addmm(bias, rows, weight)
            else:
                y = rows @ weight
            y = y.reshape(*a.shape[:-1], weight.shape[-1])
            return apply_epilogue(y, residual, activation, activation_params, residual_after_activation)

        return Launch(with_fn(reference, run))
