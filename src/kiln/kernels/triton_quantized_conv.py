"""Quantized 2-D convolution as an implicit GEMM in one Triton kernel, with the dequantize epilogue.

The rows of the GEMM are the output pixels (n, oh, ow), its columns the output channels, its
depth the (kh, kw, c) window; nothing is unfolded in memory: each tile of the window is read from
the quantized channels-last input as it lies. Any kernel size, stride, padding and dilation, one
group. Positions in the padding read the activation's zero point, so that ``xq - zero_point`` is 0
there as the float convolution's zero padding is, and the zero point's share is taken away in the
epilogue with the weight's sums over its window (:mod:`kiln.kernels.triton_epilogue`).

Two ways through the window: with many input channels, one kernel tap at a time and BLOCK_K
channels of it (contiguous loads); with few (a network's first layer, 3 channels), the flattened
window in BLOCK_K steps (gathered loads, no tap padded to a whole block of channels).

The output is channels-last in the layer's float dtype. Integer sums are exact (int32); fp8 sums
are promoted to float32 after every BLOCK_K terms, as in :mod:`kiln.kernels.triton_quantized_gemm`.

Channels a multiple of BLOCK_K (``EVEN_C``) compile loads masked only by the padding; without a
zero point, padded positions read a constant 0, which the asynchronous copies into shared memory
fill by themselves (a run-time pad value costs a select after every load; with it and the channel
masks the 3x3 convolution 64x56x56x64 -> 64 took 0.072 ms on an H100, without either 0.038 ms).

Block sizes (:func:`conv_config`) were chosen by measurement on an H100 (SXM, triton 3.6, CUDA
graphs, ResNet-50 at batch 64, bias + Relu epilogue; ``.scratch/quantized/sweep.py``, 18
configurations), int8 ms with the chosen tiles (the former table's in brackets): 3x3 64->64 at 56x56
0.037 (0.072), 128->128 at 28x28 0.027 (0.047), 256->256 at 14x14 0.027 (0.059), 512->512 at 7x7
0.028 (0.055); 1x1 64->256 at 56x56 0.081 (0.105), 256->64 at 56x56 0.043 (0.101), 1024->256 at
14x14 0.033 (0.072), 512->2048 at 7x7 0.035 (0.080). 1x1 windows have few steps per tile and
favour narrow 128x64 tiles whatever the channels; fp8 favours 64x128 tiles with BLOCK_K 128 (3x3
128->128: 0.029 against 0.039 with 128x128x64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_epilogue import (
    activation_arguments, dequantize_epilogue, load_residual, output_values, quantizes_output,
)

FEW_CHANNELS = 32  # below this many input channels the window is walked flattened


class ConvConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def conv_config(pixels: int, out_channels: int, in_channels: int, taps: int, float8: bool) -> ConvConfig:
    """Tile sizes for ``pixels`` output pixels, ``out_channels``, ``in_channels`` per tap and
    ``taps`` window positions (measured choices: the module's docstring)."""
    block_n = 128 if out_channels > 64 else 64
    if in_channels < FEW_CHANNELS:
        return ConvConfig(128, block_n, 32, 4, 3)
    block_k = 128 if in_channels % 128 == 0 else 64
    if pixels <= 64:
        return ConvConfig(32, block_n, block_k, 4, 4)
    if taps == 1 or out_channels <= 64 or in_channels <= 64:
        return ConvConfig(128, 64, 64, 4, 3 if taps > 1 else 4)
    if block_k == 128 and (float8 or in_channels >= 512):
        return ConvConfig(64, 128, 128, 4, 4)
    return ConvConfig(128, 128, 64, 4, 4)


@triton.jit
def quantized_conv2d_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, colsum_ptr, bias_ptr, residual_ptr,
    N, H, W, C, O, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_rn, stride_ro, stride_rh, stride_rw, w_scale_stride,
    x_scale, zero_point, p0, p1, out_scale, residual_scale,
    FLOAT8: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr,
    QUANTIZED_OUT: tl.constexpr, FLOAT8_OUT: tl.constexpr, FLATTENED: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Column blocks vary fastest: the programs running together share their input pixels.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(O, BLOCK_N)
    pid_m = pid // blocks_n
    pid_n = pid % blocks_n
    M = N * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < O
    # Rows and columns beyond the output read pixel/channel 0 again (in bounds; not stored).
    rows = tl.where(mask_m, offs_m, 0)
    cols = tl.where(mask_n, offs_n, 0).to(tl.int64)
    batch = rows // (OH * OW)
    oh = (rows // OW) % OH
    ow = rows % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    image = batch.to(tl.int64) * H
    w_cols = w_ptr + cols * stride_wo
    if FLOAT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        pad_value = 0.0
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if ZERO_POINT:
            pad_value = zero_point
        else:  # a constant 0: masked lanes are zero-filled by the asynchronous copies themselves
            pad_value = 0
    if FLATTENED:
        depth = C * KH * KW
        for start in range(0, depth, BLOCK_K):
            k = start + offs_k
            c = k % C
            tap = k // C
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * dilation_h)[None, :]
            iw = iw0[:, None] + (kw * dilation_w)[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (k < depth)[None, :]
            a = tl.load(x_ptr + ((image[:, None] + ih) * W + iw) * C + c[None, :], mask=inside,
                        other=pad_value)
            w_offsets = c * stride_wc + kh * stride_wh + kw * stride_ww
            b = tl.load(w_cols[None, :] + w_offsets[:, None], mask=(k < depth)[:, None], other=0.0)
            if FLOAT8:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        channel_steps = tl.cdiv(C, BLOCK_K)
        for step in range(0, KH * KW * channel_steps):
            tap = step // channel_steps
            c = (step - tap * channel_steps) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dilation_h
            iw = iw0 + kw * dilation_w
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pixel = ((image + ih) * W + iw) * C
            w_offsets = c * stride_wc + kh * stride_wh + kw * stride_ww
            if EVEN_C:  # whole blocks of channels: only the padding is masked
                a = tl.load(x_ptr + pixel[:, None] + c[None, :], mask=inside[:, None],
                            other=pad_value)
                b = tl.load(w_cols[None, :] + w_offsets[:, None])
            else:
                a = tl.load(x_ptr + pixel[:, None] + c[None, :],
                            mask=inside[:, None] & (c < C)[None, :], other=pad_value)
                b = tl.load(w_cols[None, :] + w_offsets[:, None], mask=(c < C)[:, None],
                            other=0.0)
            if FLOAT8:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # Columns from the tile's offsets (the load is masked), so rows read as contiguous.
    residual_ptrs = (residual_ptr + (batch.to(tl.int64) * stride_rn + oh * stride_rh
                                     + ow * stride_rw)[:, None] + offs_n[None, :] * stride_ro)
    residual = load_residual(residual_ptrs, mask_m, mask_n, HAS_RESIDUAL)
    y = dequantize_epilogue(
        acc, offs_m, offs_n, mask_m, mask_n, w_scale_ptr, x_scale, w_scale_ptr, w_scale_stride,
        colsum_ptr, zero_point, bias_ptr, residual, residual_scale, p0, p1,
        False, ZERO_POINT, HAS_BIAS, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION,
    )
    y = output_values(y, out_scale, QUANTIZED_OUT, FLOAT8_OUT)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * O + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quantized_conv2d(
    xq: torch.Tensor, w_q: torch.Tensor, x_scale: float, w_scale: torch.Tensor, *,
    strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
    output_size: Sequence[int], zero_point: int = 0, colsum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    residual_after_activation: int = 0, activation: str = "",
    activation_params: Sequence[float] | None = None, out_dtype: torch.dtype = torch.float16,
    out_scale: float = 0.0, residual_scale: float = 1.0, config: ConvConfig | None = None,
) -> torch.Tensor:
    """The layer's output [N, O, OH, OW] (channels-last, ``out_dtype``) from the quantized input
    ``xq`` [N, H, W, C] (int8 or float8_e4m3fn, contiguous) and weight ``w_q`` [O, C, KH, KW]
    (same dtype, any strides; channels-last reads fastest). ``pads`` are the padding before each
    spatial axis (what is after follows from ``output_size``); ``colsum`` (int32 [O], the
    weight's sums over its window) is needed with a nonzero ``zero_point``; ``residual`` is
    broadcastable to the output, float or 8-bit values times ``residual_scale``. An int8 or
    float8_e4m3fn ``out_dtype`` quantizes the output with ``out_scale`` (zero point 0), for the
    next layer."""
    batch, height, width, channels = xq.shape
    out_channels, in_channels, kernel_h, kernel_w = w_q.shape
    if in_channels != channels or not xq.is_contiguous():
        raise ValueError(
            f"quantized_conv2d takes a contiguous [N, H, W, C] input with the weight's "
            f"{in_channels} channels; got {tuple(xq.shape)} strides {xq.stride()}"
        )
    if zero_point and colsum is None:
        raise ValueError("a nonzero zero point needs the weight's sums over its window")
    out_h, out_w = output_size
    out = torch.empty((batch, out_h, out_w, out_channels), dtype=out_dtype, device=xq.device)
    out = out.permute(0, 3, 1, 2)  # [N, O, OH, OW], channels-last
    pixels = batch * out_h * out_w
    if pixels == 0 or out_channels == 0:
        return out
    quantized_out = quantizes_output(out_dtype, out_scale)
    code, p0, p1 = activation_arguments(activation, activation_params, out_dtype)
    w_scale = w_scale.reshape(-1)
    if residual is not None:
        residual = residual.expand(out.shape)
    residual_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    float8 = xq.dtype == torch.float8_e4m3fn
    cfg = config or conv_config(pixels, out_channels, channels, kernel_h * kernel_w, float8)
    grid = (triton.cdiv(pixels, cfg.block_m) * triton.cdiv(out_channels, cfg.block_n),)
    quantized_conv2d_kernel[grid](
        xq, w_q, out, w_scale, colsum if zero_point else xq, bias if bias is not None else xq,
        residual if residual is not None else xq,
        batch, height, width, channels, out_channels, out_h, out_w, kernel_h, kernel_w,
        strides[0], strides[1], pads[0], pads[1], dilations[0], dilations[1],
        w_q.stride(0), w_q.stride(1), w_q.stride(2), w_q.stride(3), *residual_strides,
        1 if w_scale.numel() > 1 else 0, float(x_scale), int(zero_point), p0, p1, float(out_scale),
        float(residual_scale),
        FLOAT8=float8, ZERO_POINT=bool(zero_point),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RESIDUAL_AFTER=bool(residual_after_activation), ACTIVATION=code,
        QUANTIZED_OUT=quantized_out, FLOAT8_OUT=out_dtype == torch.float8_e4m3fn,
        FLATTENED=channels < FEW_CHANNELS, EVEN_C=channels % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
