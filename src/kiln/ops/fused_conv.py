"""kiln-domain fused_conv operator."""

from __future__ import annotations
