"""kiln-domain fused_attention operator."""

from __future__ import annotations
