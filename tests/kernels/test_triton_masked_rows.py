"""The Triton fill of attention rows that hide every key, against PyTorch's masked_fill.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (the test set-up
turns it on); on a GPU the compiled kernel runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels.triton_masked_rows import fill_hidden_rows

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.triton_interpreter),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
BATCH, HEADS, QUERIES, KEYS, HEAD_DIM = 3, 2, 5, 7, 6


def _mask(shape, dtype, generator):
    """Random visibility with some rows hiding every key (and some rows showing one key only)."""
    shown = torch.rand(shape, generator=generator) < 0.5
    rows = shown.reshape(-1, shape[-1])
    rows[::3] = False
    rows[1::3, 1:] = False
    rows[1::3, 0] = True
    if dtype == torch.bool:
        return shown
    return torch.zeros(shape).masked_fill(~shown, -math.inf).to(dtype)


def _heads_last_output(device, dtype, generator):
    """SDPA's output as it lays it out for heads split from [batch, seq, heads * dim]."""
    merged = torch.randn(BATCH, QUERIES, HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    return merged.transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_shape", [
    (BATCH, 1, 1, KEYS),            # a padding mask per item
    (BATCH, 1, QUERIES, KEYS),      # a mask per item and query
    (1, 1, QUERIES, KEYS),          # one mask for all items
    (BATCH, HEADS, QUERIES, KEYS),  # a mask per head
    (QUERIES, KEYS),                # two axes only
])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.float16])
@pytest.mark.parametrize("fill", [math.nan, 0.0])
def test_fills_exactly_the_rows_whose_mask_hides_every_key(device, mask_shape, mask_dtype, fill):
    generator = torch.Generator().manual_seed(len(mask_shape))
    mask = _mask(mask_shape, mask_dtype, generator).to(device)
    y = _heads_last_output(device, torch.float16, generator)
    hides = ~mask.any(-1, keepdim=True) if mask_dtype == torch.bool else torch.isneginf(mask).all(-1, keepdim=True)
    assert hides.any() and not hides.all()  # the case tests something either way
    expected = y.masked_fill(hides, fill)
    result = fill_hidden_rows(y, mask, fill)
    assert result is y  # in place
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_long_key_rows_are_read_in_steps(device):
    keys = 2500  # more than one step of the loop over the mask row
    mask = torch.zeros(2, 1, 1, keys, dtype=torch.bool)
    mask[0, ..., -1] = True  # item 0 sees only its last key; item 1 sees none
    y = torch.randn(2, HEADS, QUERIES, 40).to(device)
    fill_hidden_rows(y, mask.to(device), 0.0)
    assert torch.isfinite(y[0]).all() and (y[0] != 0).all()
    assert (y[1] == 0).all()
