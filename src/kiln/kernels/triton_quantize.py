"""Activation quantization for the quantized layers in one Triton kernel: one read, one write.

Two cases, each bit-identical to :mod:`kiln.ops.quantized` as computed on the CPU:

- :func:`quantize_rows_dynamic`: per-row scales. Each row of a float ``[M, K]`` activation
  (any row stride, elements contiguous) is multiplied by ``x_inverse_smooth`` when given, its
  abs-max found, its scale ``max(amax, TINY_ABS_MAX) / format max`` computed
  (:func:`~kiln.ops.quantized.row_scales`) and the row quantized with it: int8 rows (zero point 0)
  or float8_e4m3fn rows, and the ``[M]`` float32 scales.
- :func:`quantize_rows_static`: one given scale and zero point for every element, to int8 storage
  as :func:`~kiln.ops.quantized.quantize_activation_int8` makes it (UINT8 shifted by -128) or to
  float8_e4m3fn.

Quotients are IEEE float32 quotients, correctly rounded, as the CPU reference divides (Triton's
``/`` on float32 is an approximation). A division per element (``div_rn``, a long instruction
sequence) made the kernel compute-bound: 0.051 ms for an [8192, 3072] fp16 activation on an H100
(0.036 now). Each program divides once, for the reciprocal of its scale, and each element takes a
product and an FMA correction (Markstein's), which gives the correctly rounded quotient from a
correctly rounded reciprocal. On CUDA PyTorch divides by a Python number through its float32
reciprocal, so the ``ops`` reference run there may differ from these kernels by one quantization
step where ``x / scale`` lies within an ulp of a rounding boundary.

Rounding is half to even: adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below
2**22 to an integer in the current (nearest-even) rounding mode; larger values saturate anyway, so
they are clamped into that range first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.ops.quantized import FLOAT8_MAX, INT8, INTEGER_RANGES, TINY_ABS_MAX, UINT8

SINGLE_PASS_K = 8192  # rows up to this long are read once; longer ones twice (amax, then values)
INT8_MAX = float(INTEGER_RANGES[INT8][1])
# Constants the kernels read (Triton kernels see globals only as constexpr).
ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
ROUNDABLE = tl.constexpr(4194304.0)  # 2**22: below it, the magic constant rounds exactly
SATURATION = tl.constexpr(FLOAT8_MAX)
AMAX_FLOOR = tl.constexpr(TINY_ABS_MAX)
INT8_LOW = tl.constexpr(float(INTEGER_RANGES[INT8][0]))
INT8_HIGH = tl.constexpr(INT8_MAX)
FLOAT8_MIN_EXPONENT = tl.constexpr(-6)  # float8_e4m3fn's smallest normal is 2**-6


@triton.jit
def _round_half_even(v):
    v = tl.minimum(tl.maximum(v, -ROUNDABLE), ROUNDABLE)
    return (v + ROUNDING_MAGIC) - ROUNDING_MAGIC


@triton.jit
def _round_to_float8(v):
    """``v`` (|v| <= 448) rounded half to even onto float8_e4m3fn's grid, still float32.

    The conversion that follows is then exact, on the GPU and in Triton's interpreter alike
    (whose own rounding to fp8 neither breaks ties to even nor carries into the exponent).
    Adding and subtracting ``1.5 * 2**23`` units of v's fp8 spacing rounds v to that spacing.
    """
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, FLOAT8_MIN_EXPONENT)  # subnormals share the smallest spacing
    # 1.5 * 2**(exponent - 3 + 23): the spacing is 2**(exponent - 3) with 3 mantissa bits
    magic = (((exponent + 20 + 127) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def _divide(v, scale, reciprocal):
    """``v / scale`` correctly rounded, given ``reciprocal``, ``1 / scale`` correctly rounded."""
    quotient = v * reciprocal
    return tl.fma(tl.fma(-quotient, scale, v), reciprocal, quotient)


@triton.jit
def quantize_values(v, scale, zero_point, low, high, FLOAT8: tl.constexpr):
    """``v / scale`` quantized: float8_e4m3fn, or int8 holding ``round(v / scale) + zero_point``
    saturated to ``[low, high]``."""
    scaled = _divide(v, scale, tl.math.div_rn(1.0, scale))
    # one return: Triton compiles every return statement, so both must have the same type
    if FLOAT8:
        saturated = tl.minimum(tl.maximum(scaled, -SATURATION), SATURATION)
        q = _round_to_float8(saturated).to(tl.float8e4nv)
    else:
        rounded = _round_half_even(scaled) + zero_point
        q = tl.minimum(tl.maximum(rounded, low), high).to(tl.int8)
    return q


@triton.jit
def _load_row_chunk(x_row, smooth_ptr, cols, K, SMOOTH: tl.constexpr):
    mask = cols < K
    v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        v = v * tl.load(smooth_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def quantize_rows_dynamic_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, largest,
    SMOOTH: tl.constexpr, FLOAT8: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        v = _load_row_chunk(x_row, smooth_ptr, cols, K, SMOOTH)
        amax = tl.max(tl.abs(v), axis=0)
    else:
        amaxes = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            v = _load_row_chunk(x_row, smooth_ptr, start + cols, K, SMOOTH)
            amaxes = tl.maximum(amaxes, tl.abs(v))
        amax = tl.max(amaxes, axis=0)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), largest)
    tl.store(scale_ptr + row, scale)
    if SINGLE_PASS:
        tl.store(q_row + cols, quantize_values(v, scale, 0.0, INT8_LOW, INT8_HIGH, FLOAT8), mask=cols < K)
    else:
        for start in range(0, K, BLOCK_K):
            v = _load_row_chunk(x_row, smooth_ptr, start + cols, K, SMOOTH)
            q = quantize_values(v, scale, 0.0, INT8_LOW, INT8_HIGH, FLOAT8)
            tl.store(q_row + start + cols, q, mask=start + cols < K)


@triton.jit
def quantize_rows_static_kernel(
    x_ptr, q_ptr, M, K, stride_xm, stride_qm, scale, zero_point, low, high,
    FLOAT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    q = quantize_values(v.to(tl.float32), scale, zero_point, low, high, FLOAT8)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D matrix whose elements lie contiguous along each row (a copy otherwise)."""
    if x.dim() != 2:
        raise ValueError(f"activation rows must be a 2-D matrix, not of shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def quantize_rows_dynamic(
    x: torch.Tensor, inverse_smooth: torch.Tensor | None, float8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [M, K] (times ``inverse_smooth`` [K]) quantized with their own scales:
    ``(int8 or float8_e4m3fn [M, K] contiguous, float32 scales [M])``."""
    x = _rows(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if float8 else torch.int8, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scales.fill_(TINY_ABS_MAX / (FLOAT8_MAX if float8 else INT8_MAX))
    smooth = inverse_smooth.reshape(-1).contiguous() if inverse_smooth is not None else x
    block_k = min(triton.next_power_of_2(k), SINGLE_PASS_K)
    quantize_rows_dynamic_kernel[(m,)](
        x, smooth, q, scales, k, x.stride(0), q.stride(0), FLOAT8_MAX if float8 else INT8_MAX,
        SMOOTH=inverse_smooth is not None, FLOAT8=float8, BLOCK_K=block_k,
        SINGLE_PASS=k <= block_k, num_warps=4 if block_k <= 2048 else 8,
    )
    return q, scales


def quantize_rows_static(
    x: torch.Tensor, scale: float, zero_point: int, x_type: int, float8: bool
) -> tuple[torch.Tensor, int]:
    """``x`` [M, K] quantized with one scale: ``(int8 or float8_e4m3fn [M, K] contiguous,
    zero point of that storage)``; integer types as ``quantize_activation_int8`` stores them."""
    x = _rows(x)
    m, k = x.shape
    if float8:
        low, high, zero_point8 = -FLOAT8_MAX, FLOAT8_MAX, 0
    else:
        shift = -128 if x_type == UINT8 else 0
        low, high = (bound + shift for bound in INTEGER_RANGES[x_type])
        zero_point8 = zero_point + shift
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if float8 else torch.int8, device=x.device)
    if m == 0 or k == 0:
        return q, zero_point8
    block_k = min(triton.next_power_of_2(k), 256)
    block_m = max(1, 4096 // block_k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    quantize_rows_static_kernel[grid](
        x, q, m, k, x.stride(0), q.stride(0), float(scale), float(zero_point8), float(low),
        float(high), FLOAT8=float8, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return q, zero_point8
