"""control_flow operators."""

from __future__ import annotations
