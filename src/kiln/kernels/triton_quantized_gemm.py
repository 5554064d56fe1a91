"""Quantized matrix products in one Triton kernel: int8 x int8 -> int32 (or fp8 x fp8 -> fp32) on
tensor cores, with the dequantize epilogue (:mod:`kiln.kernels.triton_epilogue`) writing the
layer's output in its float dtype.

The activation comes quantized (:mod:`kiln.kernels.triton_quantize`): int8 or float8_e4m3fn rows
[M, K] with one scale, or one per row, and a zero point (int8 only). The weight is [K, N] laid
out column by column (each column's K values contiguous, what tensor cores read as B); the
product of a tile accumulates exactly in int32. fp8 sums are promoted to float32 after every
BLOCK_K terms (``max_num_imprecise_acc``), as cuBLASLt's default does after a few of its steps:
Hopper's fp8 tensor cores add in less than float32 precision.

Block sizes come from :func:`gemm_config`, chosen by measurement on an H100 (SXM, triton 3.6,
CUDA graphs, M=8192, bias + Gelu epilogue, fp16 out; ``.scratch/quantized/sweep.py`` timed 22
configurations per shape). One configuration, 64x128 tiles with BLOCK_K 128, 4 warps (one
warpgroup: one 64-row wgmma per step) and 4 stages, was the fastest or within 2.5% of it at every
BERT-base shape for int8 and fp8 alike (ms, int8 / fp8; the former 128x128x128, 8-warp tiles in
brackets): K=768 N=3072 0.091 / 0.092 (0.103 / 0.104), K=3072 N=768 0.054 / 0.053 (0.055 / 0.056),
K=768 N=768 0.0245 / 0.0238 (0.0267 / 0.0263), K=768 N=2304 0.070 / 0.070 (0.080 / 0.079).
Larger tiles (128x256, 256x128) and deeper or shallower pipelines were no faster: with a K of 768
a tile has only 6 steps, and (likely) the epilogue (writing 2 bytes per output, against 1 byte per operand
element read) does not overlap the next tile's loads. A fixed table rather than
``triton.autotune``: autotuning would time candidates at the first call of each shape, inside an
engine's load or a CUDA graph's warm-up, for gains this sweep shows to be a few percent.

K a multiple of BLOCK_K (``EVEN_K``) compiles a loop without masks.

On Hopper, from 128 rows, with 16-byte aligned rows: :func:`quantized_gemm_tma_kernel`, whose
operand tiles arrive by the tensor memory accelerator (TMA) and whose output leaves by it, in two
half tiles. Persistent programs walk the tiles, two or three per multiprocessor, with 128x128
tiles for one warpgroup (:func:`tma_config`): one program's loads overlap another's epilogue,
which one 128x256 tile of two warpgroups per multiprocessor could not do. On an H100 (CUDA graphs,
+ bias + ReLU, fp16 out; int8 ms, one 128x256 program per SM -> these tiles; cuBLAS fp16 without
an epilogue): M=8192 K=768 N=2304 0.041 -> 0.034 (0.047), K=768 N=3072 0.048 -> 0.041 (0.060),
K=768 N=768 + residual 0.030 -> 0.018 (0.016), K=3072 N=768 + residual 0.061 -> 0.050 (0.054);
ResNet-50's 33 1x1 convolutions at batch 64 as GEMMs over pixels, weighted by count, 1.44 ->
0.95 ms (cuBLAS fp16 0.84). Sums of fp8 products use the same tiles.

A residual whose rows a tensor descriptor can address arrives by TMA too, in two halves, straight
into the accumulator's layout; by pointers it would change layout as float32 through shared memory
(and take 2,800 more instructions for its addresses). 8-bit residuals then leave room for tiles
as deep as without one; wider ones keep tiles 64 deep, so that two programs still fit. int8 ms,
pointers -> TMA (ResNet-50's 1x1 convolutions with their int8 residual and output, BERT-base's
second FFN product): M=200704 K=64 N=256 0.089 -> 0.087, M=50176 K=128 N=512 0.047 -> 0.045,
M=12544 K=256 N=1024 0.024 -> 0.022, M=3136 K=512 N=2048 0.019 -> 0.017, M=8192 K=3072 N=768
0.053 -> 0.045.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kiln.kernels.triton_epilogue import (
    COMPILED, activation_arguments, dequantize_epilogue, load_residual, output_values,
    quantizes_output,
)

TMA_ALIGNMENT = 16  # bytes: a tensor descriptor's base address and row pitch
TMA_MIN_ROWS = 128
HOPPER = (9, 0)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1  # the TMA kernel's persistent programs


def gemm_config(m: int, n: int, k: int, float8: bool) -> GemmConfig:
    """Tile sizes for an [M, K] x [K, N] product of 8-bit operands."""
    if m <= 16 and not float8:  # fp8 keeps 64-row tiles, the smallest Hopper's fp8 MMA takes
        return GemmConfig(16, 64, 128, 1, 4, 4)
    if m <= 64:
        return GemmConfig(64, 64, 128, 4, 4, 4)
    return GemmConfig(64, 128, 128, 8, 4, 4)


def tma_config(n: int, k: int, residual_bytes: int) -> GemmConfig:
    """Tile sizes for :func:`quantized_gemm_tma_kernel` whose residual tile takes
    ``residual_bytes`` per element of shared memory (0 without one; BLOCK_K at least the MMA's
    32; the module's docstring has the measurements)."""
    depth = min(128, max(32, triton.next_power_of_2(k)))
    if n <= 64:
        return GemmConfig(128, 64, depth, 8, 4, 3, 3)
    if residual_bytes > 1:
        return GemmConfig(128, 128, min(64, depth), 8, 4, 4, 2)
    return GemmConfig(128, 128, depth, 8, 4, 3, 2)


@triton.jit
def _tile_position(tile, blocks_m, blocks_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a tile: tiles in groups of GROUP_M row blocks sweep the
    columns together, so their A rows and B columns stay in L2."""
    group = tile // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * blocks_n)) % group_size, (tile % (GROUP_M * blocks_n)) // group_size


@triton.jit
def _residual_pointers(residual_ptr, offs_m, offs_n, stride_rm, stride_rn):
    # From the tile's own offsets (the load is masked): clamped ones would hide from the compiler
    # that a row's elements are contiguous, and the residual would load an element at a time
    # (ResNet-50's 1x1 64->256 convolution with its residual, batch 64, H100: 0.408 -> 0.137 ms).
    return residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn


@triton.jit
def _join_halves(left, right):
    """[BLOCK_M, BLOCK_N] from its left and right [BLOCK_M, BLOCK_N // 2] halves."""
    block_m: tl.constexpr = left.shape[0]
    block_n: tl.constexpr = 2 * left.shape[1]
    return tl.reshape(tl.permute(tl.join(left, right), (0, 2, 1)), (block_m, block_n))


@triton.jit
def quantized_gemm_kernel(
    a_ptr, b_ptr, c_ptr, row_scale_ptr, w_scale_ptr, colsum_ptr, bias_ptr, residual_ptr,
    M, N, K, stride_am, stride_bk, stride_bn, stride_cm, stride_rm, stride_rn, w_scale_stride,
    x_scale, zero_point, p0, p1, out_scale, residual_scale,
    FLOAT8: tl.constexpr, ROW_SCALES: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, QUANTIZED_OUT: tl.constexpr, FLOAT8_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns beyond the matrix read row/column 0 again (always in bounds; not stored).
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    if FLOAT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:  # no mask in the loop: plain wide copies into shared memory
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - start
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        if FLOAT8:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    residual_ptrs = _residual_pointers(residual_ptr, offs_m, offs_n, stride_rm, stride_rn)
    residual = load_residual(residual_ptrs, mask_m, mask_n, HAS_RESIDUAL)
    y = dequantize_epilogue(
        acc, offs_m, offs_n, mask_m, mask_n, row_scale_ptr, x_scale, w_scale_ptr, w_scale_stride,
        colsum_ptr, zero_point, bias_ptr, residual, residual_scale, p0, p1,
        ROW_SCALES, ZERO_POINT, HAS_BIAS, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION,
    )
    y = output_values(y, out_scale, QUANTIZED_OUT, FLOAT8_OUT)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def quantized_gemm_tma_kernel(
    a_desc, b_desc, c_desc, row_scale_ptr, w_scale_ptr, colsum_ptr, bias_ptr, residual,
    M, N, K, stride_rm, stride_rn, w_scale_stride, x_scale, zero_point, p0, p1, out_scale, residual_scale,
    FLOAT8: tl.constexpr, ROW_SCALES: tl.constexpr, ZERO_POINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, QUANTIZED_OUT: tl.constexpr, FLOAT8_OUT: tl.constexpr,
    RESIDUAL_DESCRIPTOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
):
    """``residual`` is a pointer, or with ``RESIDUAL_DESCRIPTOR`` a tensor descriptor of
    [BLOCK_M, BLOCK_N // 2] blocks."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), blocks_m * blocks_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_position(tile, blocks_m, blocks_n, GROUP_M)
        if FLOAT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        # Tiles past the matrix's edge (in M, N or K) arrive filled with zeros.
        for start in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, start])
            b = b_desc.load([pid_n * BLOCK_N, start])
            if FLOAT8:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if RESIDUAL_DESCRIPTOR:  # by TMA, in two halves as the output leaves
            residual_tile = _join_halves(
                residual.load([pid_m * BLOCK_M, pid_n * BLOCK_N]),
                residual.load([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2]),
            )
        else:
            residual_ptrs = _residual_pointers(residual, offs_m, offs_n, stride_rm, stride_rn)
            residual_tile = load_residual(residual_ptrs, mask_m, mask_n, HAS_RESIDUAL)
        y = dequantize_epilogue(
            acc, offs_m, offs_n, mask_m, mask_n, row_scale_ptr, x_scale, w_scale_ptr, w_scale_stride,
            colsum_ptr, zero_point, bias_ptr, residual_tile, residual_scale, p0, p1,
            ROW_SCALES, ZERO_POINT, HAS_BIAS, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION,
        )
        y = output_values(y, out_scale, QUANTIZED_OUT, FLOAT8_OUT).to(c_desc.dtype)
        # Stored in two halves (rows past M are not written): half the staging memory.
        left, right = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], left)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], right)


def _takes_tma_rows(matrix: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``matrix``'s rows: contiguous, each row's start
    16-byte aligned (none repeated by a zero stride)."""
    return (
        matrix.stride(-1) == 1 and matrix.stride(0) >= matrix.shape[-1]
        and matrix.data_ptr() % TMA_ALIGNMENT == 0
        and matrix.stride(0) * matrix.element_size() % TMA_ALIGNMENT == 0
    )


def _takes_tma(a: torch.Tensor, w_cols: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the TMA kernel can run this product: compiled, on Hopper or newer, rows enough and
    every operand's rows addressable by tensor descriptors."""
    return (
        COMPILED and a.is_cuda and a.shape[0] >= TMA_MIN_ROWS
        and torch.cuda.get_device_capability(a.device) >= HOPPER
        and all(_takes_tma_rows(t) for t in (a, w_cols.t(), out))
    )


def quantized_gemm(
    a: torch.Tensor, w_cols: torch.Tensor, x_scale: float | torch.Tensor, w_scale: torch.Tensor,
    *, zero_point: int = 0, colsum: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, residual_after_activation: int = 0,
    activation: str = "", activation_params: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float16, out_scale: float = 0.0, residual_scale: float = 1.0,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """The layer's output [M, N] in ``out_dtype`` from quantized rows ``a`` [M, K] (int8 or
    float8_e4m3fn, contiguous along K) and the weight ``w_cols`` [K, N] (the same dtype, contiguous
    along K). ``x_scale`` is one number or float32 [M] row scales; ``colsum`` (int32 [N], the
    weight's column sums) is needed with a nonzero ``zero_point``; ``residual`` is [M, N], any
    strides (0 to broadcast), float or 8-bit values times ``residual_scale``. An int8 or
    float8_e4m3fn ``out_dtype`` quantizes the output with ``out_scale`` (zero point 0), for the
    next layer."""
    m, k = a.shape
    n = w_cols.shape[1]
    if w_cols.shape[0] != k or a.stride(1) != 1 or w_cols.stride(0) != 1:
        raise ValueError(
            f"quantized_gemm takes K-contiguous operands [M, K] x [K, N]; got {tuple(a.shape)} "
            f"strides {a.stride()} and {tuple(w_cols.shape)} strides {w_cols.stride()}"
        )
    if zero_point and colsum is None:
        raise ValueError("a nonzero zero point needs the weight's column sums")
    float8 = a.dtype == torch.float8_e4m3fn
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    quantized_out = quantizes_output(out_dtype, out_scale)
    code, p0, p1 = activation_arguments(activation, activation_params, out_dtype)
    row_scales = isinstance(x_scale, torch.Tensor)
    w_scale = w_scale.reshape(-1)
    if residual is not None:
        residual = residual.expand(m, n)
    epilogue_args = (
        x_scale if row_scales else a, w_scale, colsum if zero_point else a,
        bias if bias is not None else a, residual if residual is not None else a,
    )
    epilogue_flags = dict(
        FLOAT8=float8, ROW_SCALES=row_scales, ZERO_POINT=bool(zero_point),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RESIDUAL_AFTER=bool(residual_after_activation), ACTIVATION=code,
        QUANTIZED_OUT=quantized_out, FLOAT8_OUT=out_dtype == torch.float8_e4m3fn,
    )
    residual_strides = (residual.stride(0), residual.stride(1)) if residual is not None else (0, 0)
    scalars = (1 if w_scale.numel() > 1 else 0, 0.0 if row_scales else float(x_scale), int(zero_point),
               p0, p1, float(out_scale), float(residual_scale))
    if config is None and _takes_tma(a, w_cols, out):
        # float32 residuals keep to pointers: two halves of them would crowd two programs out
        residual_descriptor = residual is not None and residual.element_size() <= 2 and _takes_tma_rows(residual)
        # a residual by pointers changes layout as float32 through shared memory
        residual_bytes = 0 if residual is None else residual.element_size() if residual_descriptor else 4
        cfg = tma_config(n, k, residual_bytes)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        programs = min(tiles, sms * cfg.programs_per_sm)
        half_tile = [cfg.block_m, cfg.block_n // 2]
        if residual_descriptor:
            epilogue_args = (*epilogue_args[:-1], TensorDescriptor.from_tensor(residual, half_tile))
        quantized_gemm_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(w_cols.t(), [cfg.block_n, cfg.block_k]),
            TensorDescriptor.from_tensor(out, half_tile),
            *epilogue_args, m, n, k, *residual_strides, *scalars, **epilogue_flags,
            RESIDUAL_DESCRIPTOR=residual_descriptor, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            PROGRAMS=programs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    cfg = config or gemm_config(m, n, k, float8)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    quantized_gemm_kernel[grid](
        a, w_cols, out, *epilogue_args,
        m, n, k, a.stride(0), w_cols.stride(0), w_cols.stride(1), out.stride(0),
        *residual_strides, *scalars, **epilogue_flags,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
