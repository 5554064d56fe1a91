"""kiln-domain fused_norm operator."""

from __future__ import annotations
