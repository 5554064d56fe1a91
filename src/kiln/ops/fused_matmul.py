"""kiln-domain fused_matmul operator."""

from __future__ import annotations
