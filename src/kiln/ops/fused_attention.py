"""``kiln::Attention``: scaled dot-product attention over heads, as one layer.

``Y = softmax(scale * Q @ K^T + mask) @ V`` per batch and head, computed by
``torch.nn.functional.scaled_dot_product_attention``.

- ``layout="bsd"``: Q, K, V are the projections in (batch, seq, heads * head_dim), split into
  ``num_heads`` heads here; Y comes back merged the same way. ``layout="bhsd"``: Q, K, V and Y are
  (batch, heads, seq, head_dim) already (``num_heads`` is then informative only, 0 when unknown).
  ``layout="bsd_packed"``: one input, ``qkv`` in (batch, seq, 3 * heads * head_dim), holds Q, K
  and V as ``qkv.reshape(batch, seq, 3, num_heads, head_dim)`` lays them out (Q at index 0 of the
  third axis, then K, then V; ``k`` and ``v`` are omitted); Y comes back merged as for "bsd".
- ``scale``: absent means 1 / sqrt(head_dim).
- ``mask`` broadcasts to (batch, heads, q_seq, kv_seq): ``mask_kind="additive"`` adds it to the
  scores, ``"boolean"`` lets a query see the keys where it is true. ``causal=1`` also hides the keys
  after each query (top-left aligned: query i sees keys 0..i); with a mask, those keys get
  ``causal_fill`` (-inf, or the finite fill of the graph it came from) added to the mask.
- ``masked_rows``: what a query whose mask hides every key outputs. ``"nan"`` is what the softmax
  of the decomposed graph gives (fusion keeps it); ``"zero"`` is ONNX Attention's definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.ops.activation import KILN
from kiln.ops.registry import register


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def _unpack_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, S, 3*H*D) -> Q, K, V, each (B, H, S, D)."""
    packed = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, num_heads, -1)
    return packed.permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H*D): a view when SDPA wrote its output heads-last, as it does for
    heads split from (B, S, H*D)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _with_causal(mask: torch.Tensor, q_len: int, kv_len: int, fill: float, dtype: torch.dtype):
    """``mask`` that also gives ``fill`` to the keys after each query (added to the mask, as the
    graphs this fuses add their user mask to the causally filled scores)."""
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool and math.isinf(fill):
        return mask & visible
    if mask.dtype == torch.bool:
        mask = _filled(~mask, -math.inf, dtype)
    return mask + _filled(~visible, fill, dtype)


def _filled(where: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """``fill`` where ``where`` is true, 0 elsewhere."""
    return torch.zeros(where.shape, dtype=dtype, device=where.device).masked_fill(where, fill)


def _raise_floor(mask: torch.Tensor) -> torch.Tensor:
    """Finite mask values near the type's minimum raised to a quarter of it. CUDA's fused SDPA
    kernels scale the mask by log2(e) in float32, which turns such float32 values into -inf (a row
    of them would give zeros instead of the graph's uniform softmax); -inf stays. 16-bit masks
    need none of this: their minimum times log2(e) is a finite float32."""
    floor = torch.finfo(mask.dtype).min / 4
    return torch.where(torch.isneginf(mask), mask, mask.clamp(min=floor))


def _hides_every_key(mask: torch.Tensor) -> torch.Tensor:
    """Per query row (keepdim), whether the mask leaves it no key to attend to."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


@register("Attention", domain=KILN)
def attention(q, k=None, v=None, mask=None, *, num_heads=0, scale=None, causal=0,
              causal_fill=-math.inf, mask_kind="none", layout="bsd", masked_rows="nan"):
    y, mask = attend(q, k, v, mask, num_heads=num_heads, scale=scale, causal=causal,
                     causal_fill=causal_fill, mask_kind=mask_kind, layout=layout)
    if mask is None:
        return y if layout == "bhsd" else merge_heads(y)
    # SDPA's answer for rows that hide every key differs between backends; pin it to the graph's.
    hides = _hides_every_key(mask)
    fill = masked_rows_fill(masked_rows)
    if layout == "bhsd":
        return y.masked_fill_(hides, fill)  # y is SDPA's fresh output: filled in place
    return _merge_heads_filling(y, hides, fill)


def attend(q, k=None, v=None, mask=None, *, num_heads=0, scale=None, causal=0,
           causal_fill=-math.inf, mask_kind="none", layout="bsd"):
    """SDPA's output, (batch, heads, seq, head_dim), and the mask it was given (None without one).

    Rows the mask hides entirely are left as SDPA's back end computed them: the caller fills them
    (with :func:`masked_rows_fill`), then merges the heads where the layout wants it
    (:func:`merge_heads`)."""
    if layout == "bsd_packed":
        q, k, v = _unpack_heads(q, num_heads)
    elif layout == "bsd":
        q, k, v = (_split_heads(t, num_heads) for t in (q, k, v))
    if mask_kind == "none":
        mask = None
    elif mask.dim() < 2:  # a scalar or per-key bias: give it the query axis SDPA expects
        mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
    if mask is not None and mask.shape[-1] != k.shape[-2]:
        # A mask broadcast along the keys: SDPA's CUDA kernels need that axis in memory.
        mask = mask.expand(*mask.shape[:-1], k.shape[-2]).contiguous()
    if mask is not None and causal:
        mask = _with_causal(mask, q.shape[-2], k.shape[-2], causal_fill, q.dtype)
    if mask is not None and mask.dtype in (torch.float32, torch.float64):
        mask = _raise_floor(mask)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=bool(causal) and mask is None, scale=scale
    )
    return y, mask


def masked_rows_fill(masked_rows: str) -> float:
    """What a query row whose mask hides every key outputs (the ``masked_rows`` attribute)."""
    return math.nan if masked_rows == "nan" else 0.0


def _merge_heads_filling(y: torch.Tensor, hides: torch.Tensor, fill: float) -> torch.Tensor:
    """``merge_heads(y.masked_fill(hides, fill))`` in one pass over ``y``: the fill is written
    straight into the merged layout (masked_fill, then the merge's copy, read and write y twice)."""
    hides = hides.reshape((1,) * (4 - hides.dim()) + tuple(hides.shape)).transpose(1, 2)
    heads_last = y.transpose(1, 2)  # [B, S, H, D]
    merged = torch.empty(heads_last.shape, dtype=y.dtype, device=y.device)
    torch.where(hides, torch.full((), fill, dtype=y.dtype, device=y.device), heads_last, out=merged)
    return merged.reshape(y.shape[0], y.shape[2], -1)
