"""Attention rows whose mask hides every key, filled in one small Triton kernel.

What SDPA outputs for such a row differs between its back ends, so the attention layer pins it
(NaN, as the decomposed softmax gives, or 0, ONNX Attention's definition). Done with PyTorch ops
that takes a reduction over the mask, then a pass that reads and writes all of the output: about
a twentieth of BERT-base's run at batch 64, for rows that padding-free batches never have. Here
one program per mask row finds whether the row hides every key and, only then, writes the fill to
the output rows it covers: the output is not read at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_KEYS = 1024  # keys read per step of a program's loop over its mask row


@triton.jit
def _fill_hidden_rows(
    mask_ptr, y_ptr, keys, mask_heads, mask_queries,
    mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k,
    cover_b, cover_h, cover_q, y_stride_b, y_stride_h, y_stride_q, y_stride_d, head_dim, fill,
    IS_BOOL: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    q = row % mask_queries
    h = (row // mask_queries) % mask_heads
    b = row // (mask_queries * mask_heads)
    base = mask_ptr + b.to(tl.int64) * mask_stride_b + h * mask_stride_h + q * mask_stride_q
    visible = 0
    for start in range(0, keys, BLOCK_KEYS):
        offsets = start + tl.arange(0, BLOCK_KEYS)
        inside = offsets < keys
        if IS_BOOL:
            shown = tl.load(base + offsets * mask_stride_k, mask=inside, other=0) != 0
        else:
            values = tl.load(base + offsets * mask_stride_k, mask=inside, other=float("-inf"))
            shown = values.to(tl.float32) != float("-inf")
        visible += tl.sum(shown.to(tl.int32), axis=0)
    if visible == 0:
        # The output rows this mask row stands for: all along each axis it broadcasts over.
        columns = tl.arange(0, BLOCK_D)
        filler = tl.full([BLOCK_D], fill, tl.float32).to(y_ptr.dtype.element_ty)
        for i in range(cover_b * cover_h * cover_q):
            yb = b + i // (cover_h * cover_q)
            yh = h + (i // cover_q) % cover_h
            yq = q + i % cover_q
            out = y_ptr + yb.to(tl.int64) * y_stride_b + yh * y_stride_h + yq * y_stride_q
            for d in range(0, head_dim, BLOCK_D):
                tl.store(out + (d + columns) * y_stride_d, filler, mask=d + columns < head_dim)


def fill_hidden_rows(y: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """Write ``fill`` in place into the rows of ``y`` (batch, heads, queries, head_dim) whose
    ``mask`` row (boolean: true shows a key; additive: -inf hides it), broadcast to (batch, heads,
    queries, keys), hides every key; returns ``y``."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    batch, heads, queries, head_dim = y.shape
    mb, mh, mq, keys = mask.shape
    if 0 in (mb, mh, mq, head_dim):
        return y
    mask_strides = [0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride())]
    covers = [full if size == 1 else 1 for size, full in zip((mb, mh, mq), (batch, heads, queries))]
    _fill_hidden_rows[(mb * mh * mq,)](
        mask, y, keys, mh, mq, *mask_strides, *covers, *y.stride(), head_dim, fill,
        IS_BOOL=mask.dtype == torch.bool,
        BLOCK_KEYS=min(triton.next_power_of_2(max(keys, 1)), MAX_BLOCK_KEYS),
        BLOCK_D=min(triton.next_power_of_2(head_dim), 256),
    )
    return y
