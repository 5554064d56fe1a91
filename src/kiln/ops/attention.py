"""Attention (opset 23-25), RotaryEmbedding, LinearAttention, CausalConvWithState, and the preview
FlexAttention.

Attention takes 4-D (batch, heads, sequence, head_size) inputs, or 3-D (batch, sequence,
heads * head_size) ones with ``q_num_heads``/``kv_num_heads``. Query heads outnumbering key/value
heads share them in contiguous groups (GQA). Masks of every kind (``attn_mask``, ``is_causal``,
sliding windows, ``nonpad_kv_seqlen``) become one additive bias of 0 / -inf; a query row that the
bias masks entirely gets zero probabilities (and so a zero output), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    batch, length, hidden = x.shape
    return x.reshape(batch, length, num_heads, hidden // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H*D)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _share_kv_heads(kv: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat each key/value head for its group of query heads."""
    return kv.repeat_interleave(q_heads // kv.shape[1], dim=1) if kv.shape[1] != q_heads else kv


def _scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Q K^T times scale, applying sqrt(scale) to each side so the product cannot overflow."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # Rounded to the inputs' type first, as ONNX's function body and reference do (filled on the
    # device: a copy from host memory could not be captured in a CUDA graph).
    root = torch.full((), math.sqrt(scale), dtype=q.dtype, device=q.device)
    return torch.matmul(q * root, (k * root).transpose(-1, -2))


def _softmax_stepwise(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis rounding after each step (subtract max, exp, sum, divide) in
    x's type, as ONNX's Attention function body does; an all -inf row gives zeros."""
    peak = x.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    exps = torch.exp(x - peak)
    total = exps.sum(dim=-1, keepdim=True)
    return exps / torch.where(total == 0, torch.ones_like(total), total)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full_like(zero, -math.inf))


def _mask_bias(attn_mask: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """attn_mask as an additive bias, padded with -inf up to the key length."""
    bias = _additive(attn_mask, dtype) if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    missing = kv_len - bias.shape[-1]
    return F.pad(bias, (0, missing), value=-math.inf) if missing > 0 else bias


def _relative_positions(
    q_len: int, kv_len: int, offset: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Absolute query position minus key position: (q, kv), or (B, 1, q, kv) for per-batch
    offsets."""
    query = torch.arange(q_len, device=device).reshape(q_len, 1)
    key = torch.arange(kv_len, device=device).reshape(1, kv_len)
    if isinstance(offset, torch.Tensor):
        return offset.reshape(-1, 1, 1, 1) + query - key
    return offset + query - key


def _attention_bias(
    attn_mask, nonpad_kv_seqlen, past_len, q_len, kv_len, is_causal, left_window, right_window,
    dtype, device,
):
    """The additive bias of all masks together, or None when nothing is masked."""
    bias = None if attn_mask is None else _mask_bias(attn_mask, kv_len, dtype)
    # Keys preceding the query block: the internal cache, or the external cache's valid keys.
    offset: int | torch.Tensor = past_len
    if past_len == 0 and nonpad_kv_seqlen is not None:
        offset = nonpad_kv_seqlen.to(device) - q_len
    allowed = None
    if is_causal or left_window >= 0 or right_window >= 0:
        distance = _relative_positions(q_len, kv_len, offset, device)
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if is_causal:
            allowed &= distance >= 0
        if left_window >= 0:
            allowed &= distance <= left_window
        if right_window >= 0:
            allowed &= -distance <= right_window
    if nonpad_kv_seqlen is not None:
        key = torch.arange(kv_len, device=device)
        valid = (key < nonpad_kv_seqlen.to(device).reshape(-1, 1)).reshape(-1, 1, 1, kv_len)
        allowed = valid if allowed is None else allowed & valid
    if allowed is not None:
        bias = _additive(allowed, dtype) if bias is None else bias + _additive(allowed, dtype)
    return bias


@register("Attention", since=23)
def attention(
    q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *,
    is_causal=0, kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None,
    softcap=0.0, softmax_precision=None, left_window_size=-1, right_window_size=-1,
):
    packed = q.dim() == 3
    if packed:
        q, k, v = _split_heads(q, q_num_heads), _split_heads(k, kv_num_heads), _split_heads(
            v, kv_num_heads
        )
    past_len = 0
    if past_key is not None:
        past_len = past_key.shape[2]
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = _attention_bias(
        attn_mask, nonpad_kv_seqlen, past_len, q_len, kv_len, is_causal, left_window_size,
        right_window_size, q.dtype, q.device,
    )

    heads = q.shape[1]
    raw = _scaled_scores(q, _share_kv_heads(k, heads), scale)
    capped = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    biased = capped if bias is None else capped + bias
    softmax_dtype = q.dtype if softmax_precision is None else torch_dtype(softmax_precision)
    probs = _softmax_stepwise(biased.to(softmax_dtype))
    if bias is not None:
        fully_masked = torch.isneginf(bias.amax(dim=-1, keepdim=True))
        probs = torch.where(fully_masked, torch.zeros_like(probs), probs)
    probs = probs.to(q.dtype)
    y = torch.matmul(probs, _share_kv_heads(v, heads))
    if packed:
        y = _merge_heads(y)
    qk_output = (raw, capped, biased, probs)[qk_matmul_output_mode].to(q.dtype)
    return y, present_key, present_value, qk_output


@register("RotaryEmbedding", since=23)
def rotary_embedding(
    x, cos_cache, sin_cache, position_ids=None, *, interleaved=0, num_heads=0,
    rotary_embedding_dim=0,
):
    # Work on (B, S, H, D).
    rows = x.transpose(1, 2) if x.dim() == 4 else x.reshape(*x.shape[:2], num_heads, -1)
    rotated_dims = rotary_embedding_dim or rows.shape[-1]
    to_rotate, kept = rows[..., :rotated_dims], rows[..., rotated_dims:]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)  # (B, S, 1, rotated_dims / 2)
    if interleaved:
        first, second = to_rotate[..., 0::2], to_rotate[..., 1::2]
    else:
        first, second = to_rotate.chunk(2, dim=-1)
    real = cos * first - sin * second
    imag = sin * first + cos * second
    if interleaved:
        rotated = torch.stack([real, imag], dim=-1).reshape(to_rotate.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, kept], dim=-1)
    return out.transpose(1, 2) if x.dim() == 4 else out.reshape(x.shape)


@register("LinearAttention", since=27)
def linear_attention(
    query, key, value, past_state=None, decay=None, beta=None, *, chunk_size=64,
    kv_num_heads, q_num_heads, scale=0.0, update_rule="gated_delta",
):
    """Recurrent linear attention over a (B, H_kv, d_k, d_v) state, in float32:
    gated rules decay the state by exp(decay), delta rules write beta * (v - S^T k)."""
    batch, length, _ = query.shape
    q = _split_heads(query, q_num_heads).float()
    k = _split_heads(key, kv_num_heads).float()
    v = _split_heads(value, kv_num_heads).float()
    key_dim, value_dim = k.shape[-1], v.shape[-1]
    if decay is not None:
        # Per head (B, T, H_kv) or per key dimension (B, T, H_kv * d_k): as (B, H_kv, T, 1 or d_k).
        per_head = decay.shape[-1] == kv_num_heads
        decay = decay.reshape(batch, length, kv_num_heads, -1 if not per_head else 1)
        decay = decay.transpose(1, 2).float()
    if beta is not None:  # (B, T, H_kv or 1) -> (B, H_kv or 1, T, 1)
        beta = beta.reshape(batch, length, beta.shape[-1], 1).transpose(1, 2).float()
    if past_state is None:
        state = torch.zeros(batch, kv_num_heads, key_dim, value_dim, device=query.device)
        state_dtype = query.dtype
    else:
        state, state_dtype = past_state.float(), past_state.dtype
    scale = scale or 1.0 / math.sqrt(key_dim)

    outputs = []
    for t in range(length):
        k_t, v_t = k[:, :, t], v[:, :, t]
        if decay is not None:
            state = state * torch.exp(decay[:, :, t]).unsqueeze(-1)
        if beta is not None:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = beta[:, :, t] * (v_t - retrieved)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = _share_kv_heads(state, q_num_heads)
        outputs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, t], read))
    y = _merge_heads(torch.stack(outputs, dim=2)) if outputs else query.new_zeros(
        batch, 0, q_num_heads * value_dim
    )
    return y.to(query.dtype), state.to(state_dtype)


@register("CausalConvWithState", since=27)
def causal_conv_with_state(x, weight, bias=None, past_state=None, *, activation="none"):
    """Depthwise causal 1-D convolution continuing from the last kernel-1 inputs of a stream."""
    channels, taps = x.shape[1], weight.shape[2]
    if past_state is None:
        past_state = x.new_zeros(x.shape[0], channels, taps - 1)
    padded = torch.cat([past_state, x], dim=2)
    y = F.conv1d(padded, weight, bias, groups=channels)
    if activation in ("silu", "swish"):
        y = F.silu(y.float()).to(x.dtype)
    return y, padded[:, :, padded.shape[2] - (taps - 1):]


def _flex_softmax_dtype(dtype: torch.dtype, softmax_precision: int | None) -> torch.dtype:
    if softmax_precision is not None:
        return torch_dtype(softmax_precision)
    return torch.float64 if dtype == torch.float64 else torch.float32


@register("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(q, k, v, *, scale=None, score_mod=None, prob_mod=None, softmax_precision=None):
    heads = q.shape[1]
    compute_dtype = _flex_softmax_dtype(q.dtype, softmax_precision)
    scores = _scaled_scores(q, _share_kv_heads(k, heads), scale).to(compute_dtype)
    if score_mod is not None:
        scores = score_mod(scores)[0].to(compute_dtype)
    probs = torch.softmax(scores, dim=-1)
    if prob_mod is not None:
        probs = prob_mod(probs)[0].to(compute_dtype)
    return torch.matmul(probs, _share_kv_heads(v, heads).to(compute_dtype)).to(v.dtype)
