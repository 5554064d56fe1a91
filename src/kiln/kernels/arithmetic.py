"""The arithmetic an engine promises for float32 layers, whatever the process has set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fp32_arithmetic(tf32: bool = False) -> Iterator[None]:
    """fp32 matmuls and convolutions as the engine promises, whatever the process set: strict
    (no TF32) by default, on TF32 tensor cores for a ``tf32`` engine."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def strict_fp32() -> contextlib.AbstractContextManager[None]:
    return fp32_arithmetic(tf32=False)
