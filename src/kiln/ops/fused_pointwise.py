"""kiln-domain fused_pointwise operator."""

from __future__ import annotations
