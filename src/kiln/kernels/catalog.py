"""Every choice kiln has, in one list per op: preferred first, the ``ops`` fallback last.

Without timing (tuning level 0, or a spec whose shapes are not known) the first choice that
supports a spec wins, so each list is ordered by what is usually fastest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.kernels.choice import Choice, OpsChoice
from kiln.kernels.cublas_gemm import CublasLtGemmChoice
from kiln.kernels.cudnn_conv import CudnnConvChoice, CudnnFusedConvChoice
from kiln.kernels.fp8_gemm import CublasLtFp8GemmChoice
from kiln.kernels.int8_gemm import CublasLtInt8Conv1x1Choice, CublasLtInt8GemmChoice
from kiln.kernels.patch_gemm import PatchGemmChoice
from kiln.kernels.sdpa import SDPA_CHOICES
from kiln.kernels.space_to_depth_conv import SpaceToDepthConvChoice
from kiln.kernels.torch_norm import TorchLayerNormChoice, TorchRMSNormChoice
from kiln.kernels.triton_norm import TritonLayerNormChoice, TritonRMSNormChoice
from kiln.kernels.triton_pointwise import TritonPointwiseChoice
from kiln.kernels.triton_pool import TritonMaxPoolChoice
from kiln.kernels.triton_quantized import TritonQuantizedConvChoice, TritonQuantizedMatMulChoice

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

FALLBACK = OpsChoice()
CHOICES: list[Choice] = [
    CudnnConvChoice(),
    CudnnFusedConvChoice(),
    PatchGemmChoice(),
    SpaceToDepthConvChoice(),
    CublasLtGemmChoice(),
    TritonQuantizedMatMulChoice(),
    TritonQuantizedConvChoice(),
    CublasLtInt8GemmChoice(),
    CublasLtInt8Conv1x1Choice(),
    CublasLtFp8GemmChoice(),
    *SDPA_CHOICES,
    TritonLayerNormChoice(),
    TritonRMSNormChoice(),
    TorchLayerNormChoice(),
    TorchRMSNormChoice(),
    TritonPointwiseChoice(),
    TritonMaxPoolChoice(),
]
BY_ID: dict[str, Choice] = {choice.id: choice for choice in [*CHOICES, FALLBACK]}


def choices_for(spec: KernelSpec, device: str) -> list[Choice]:
    """The choices that support ``spec`` on ``device``, preferred first; ``ops`` closes the list."""
    op = (spec.domain, spec.op_type)
    return [*(c for c in CHOICES if op in c.op_types and c.supports(spec, device)), FALLBACK]
