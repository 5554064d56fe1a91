"""``kiln::Pointwise``: a group of elementwise ops that runs as one layer.

Its ``body`` attribute is an ONNX graph of ordinary elementwise ops (and ``kiln::Activation``)
whose inputs are the node's inputs, in order, and whose outputs are the node's outputs. Here the
body simply runs op by op; a generated kernel implements the same body in one launch.
"""

from __future__ import annotations

from typing import Any

from kiln.ops.activation import KILN
from kiln.ops.registry import Subgraph, register


@register("Pointwise", domain=KILN)
def pointwise(*inputs: Any, body: Subgraph) -> tuple:
    return tuple(body(*inputs))
