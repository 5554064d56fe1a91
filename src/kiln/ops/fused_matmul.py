"""``kiln::FusedMatMul``: a matrix product with its epilogue (scale, bias, residual, activation).

It is what fusion makes of Gemm and of MatMul followed by a bias Add, an activation and a residual
Add: ``Y = act(alpha * op(A) @ op(B) + beta * bias + residual)``, or with
``residual_after_activation=1``, ``Y = act(alpha * op(A) @ op(B) + beta * bias) + residual``.
``op`` transposes the last two axes when ``trans_a`` / ``trans_b`` is set; A may be batched
(N-D @ 2-D weight), with ONNX MatMul broadcasting.
"""

from __future__ import annotations

import torch

from kiln.ops.activation import KILN, apply_epilogue
from kiln.ops.registry import register


@register("FusedMatMul", domain=KILN)
def fused_matmul(a, b, bias=None, residual=None, *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0,
                 activation="", activation_params=None, residual_after_activation=0):
    y = torch.matmul(a.transpose(-1, -2) if trans_a else a, b.transpose(-1, -2) if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if bias is not None:
        y = y + (bias * beta if beta != 1.0 else bias)
    return apply_epilogue(y, residual, activation, activation_params, residual_after_activation)
