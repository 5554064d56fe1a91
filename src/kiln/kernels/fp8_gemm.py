"""FP8 quantized matrix products on fp8 tensor cores: cuBLASLt through ``torch._scaled_mm``.

The activation is quantized to float8_e4m3fn as :mod:`kiln.ops.quantized` defines it, then
``torch._scaled_mm(xq, w_q, scale_a, scale_b, out_dtype=float32)`` multiplies it by the fp8
weight (compute capability 8.9 or newer; K and N multiples of 16; the activation row-major, the
weight column-major, laid out so once when the engine loads; any number of rows).

Scaling: ``_scaled_mm`` takes a pair of tensor-wise scales or a pair of row-wise ones
(``[M, 1]`` and ``[1, N]``), not a per-tensor activation scale with per-column weight scales.
Row-wise would need x_scale spread over M rows at every call, and with a float32 output (the
layer's epilogue runs in float32) cuBLASLt adds no bias, so its epilogue would not save the pass
that adds it. So the GEMM takes x_scale tensor-wise and the per-column ``w_scale`` is applied
with the bias in one pass, ``addcmul(bias, mm, w_scale)``, before the layer's epilogue and the
cast to x's dtype. Accumulation is cuBLASLt's default (``use_fast_accum=False``), the more precise
of its two modes: on an H100 its sums stray from the exact ones by up to about 3e-4 of the sum of
the terms' magnitudes (fast accumulation: up to 6e-4, growing with K).

Dynamic (per-row) activation scales go to ``_scaled_mm`` row-wise, with the per-column weight
scales as its other side.

Not ``timed_only``, for the reasons :mod:`kiln.kernels.int8_gemm` gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels.choice import FLOAT_TYPES, Choice, Launch, attributes_of, input_dtypes, with_fn
from kiln.kernels.int8_gemm import column_major
from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.quantized import FLOAT8E4M3FN, matmul_activation, quantize_activation
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

ALIGNMENT = 16  # K and N of torch._scaled_mm
MIN_CAPABILITY = (8, 9)


def fp8_tensor_cores() -> bool:
    """Whether this process's GPU multiplies fp8 (Ada, Hopper and newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= MIN_CAPABILITY


class CublasLtFp8GemmChoice(Choice):
    """QuantizedMatMul with a FLOAT8E4M3FN activation: one fp8 GEMM over the flattened rows."""

    id = "fp8-scaled-mm"
    op_types = ((KILN, "QuantizedMatMul"),)

    def supports(self, spec: KernelSpec, device: str) -> bool:
        dtypes = input_dtypes(spec)
        attributes = attributes_of(spec)
        if not (
            device == "cuda"
            and dtypes[0] in FLOAT_TYPES
            and len(dtypes) > 2 and dtypes[1] == FLOAT8E4M3FN
            and attributes.get("x_type") == FLOAT8E4M3FN
            # 8-bit values handed over, out or in as a residual: Triton's epilogue
            and not attributes.get("y_type", 0) and not attributes.get("residual_scale", 0.0)
        ):
            return False
        weight = spec.input_types[1].shape
        if weight is None or len(weight) != 2 or not all(isinstance(d, int) for d in weight):
            return False
        k, n = weight
        return k > 0 and n > 0 and k % ALIGNMENT == 0 and n % ALIGNMENT == 0 and fp8_tensor_cores()

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        scalars: dict[tuple[float, torch.device], torch.Tensor] = {}

        def scalar(value: float, device: torch.device) -> torch.Tensor:
            """A float32 scalar on ``device`` (kept once made outside a CUDA graph capture)."""
            key = (value, device)
            if key in scalars:
                return scalars[key]
            tensor = torch.full((), value, dtype=torch.float32, device=device)
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                scalars[key] = tensor
            return tensor

        def run(x, w_q, w_scale, bias=None, residual=None, x_inverse_smooth=None, *, x_scale=0.0,
                x_type=FLOAT8E4M3FN, dynamic=0, activation="", activation_params=None,
                residual_after_activation=0, **_same_as_reference):
            k, n = w_q.shape
            values, scale = matmul_activation(
                x.reshape(-1, k), x_inverse_smooth, x_scale, x_type, dynamic
            )
            rows = quantize_activation(values, scale, 0, x_type).contiguous()
            w_scale = w_scale.to(torch.float32)
            if dynamic:  # row-wise scales on both sides: cuBLASLt applies them in its epilogue
                y = torch._scaled_mm(
                    rows, column_major(w_q), scale_a=scale.reshape(-1, 1).contiguous(),
                    scale_b=w_scale.reshape(1, -1).expand(1, n).contiguous(),
                    out_dtype=torch.float32,
                )
                if bias is not None:
                    y = y.add_(bias.to(torch.float32))
            else:
                product = torch._scaled_mm(
                    rows, column_major(w_q), scale_a=scalar(x_scale, x.device),
                    scale_b=scalar(1.0, x.device), out_dtype=torch.float32,
                )
                if bias is None:
                    y = product.mul_(w_scale)
                else:
                    y = torch.addcmul(bias.to(torch.float32), product, w_scale)
            y = y.reshape(*x.shape[:-1], n)
            y = apply_epilogue(y, residual, activation, activation_params, residual_after_activation)
            return y.to(x.dtype)

        return Launch(with_fn(reference, run), {1: column_major})
