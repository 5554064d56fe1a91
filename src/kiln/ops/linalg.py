"""Matrix products (MatMul, Gemm, Einsum) and Det.

torch implements integer matrix products on the CPU only; elsewhere they run on a CPU copy, which
is exact and wraps around like ONNX's integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.ops.registry import register


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def _exact_product(fn: Callable[..., torch.Tensor], *operands: torch.Tensor) -> torch.Tensor:
    """``fn(*operands)``, moved to the CPU for integer operands on other devices."""
    device = operands[0].device
    if device.type == "cpu" or not _is_integer(operands[0]):
        return fn(*operands)
    return fn(*(t.cpu() for t in operands)).to(device)


@register("MatMul", since=1)
def matmul(a, b):
    return _exact_product(torch.matmul, a, b)


@register("Gemm", since=1)
def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=0):
    a = a.T if transA else a
    b = b.T if transB else b
    y = _exact_product(torch.matmul, a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c * beta if beta != 1.0 else c)
    return y.to(a.dtype)


@register("Einsum", since=12)
def einsum(*inputs, equation):
    equation = equation.replace(" ", "")
    if inputs[0].dtype == torch.bfloat16:  # accumulate in float32, as ONNX's reference does
        return torch.einsum(equation, *(t.float() for t in inputs)).to(torch.bfloat16)
    return _exact_product(lambda *ts: torch.einsum(equation, *ts), *inputs)


@register("Det", since=11)
def det(x):
    if x.dtype in (torch.float16, torch.bfloat16):  # no half-precision LU in torch
        return torch.linalg.det(x.float()).to(x.dtype)
    return torch.linalg.det(x)
