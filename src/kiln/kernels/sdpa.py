"""Attention through one chosen back end of PyTorch's scaled_dot_product_attention.

Left to itself, SDPA picks a back end by heuristics; tuning times each instead. A back end that
cannot take a spec (Flash attention takes no additive mask) fails when timed and is not chosen.
Within a profile's range a shape the tuned back end cannot take (an alignment it needs) falls back
to PyTorch's own selection: the refusal comes before any launch, so CUDA graphs capture either.
Rows a mask hides entirely get their pinned value from one small Triton kernel
(:mod:`kiln.kernels.triton_masked_rows`), and the heads merge as a view of SDPA's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.kernels.choice import Choice, Launch, with_fn
from kiln.kernels.triton_masked_rows import fill_hidden_rows
from kiln.ops.activation import KILN
from kiln.ops.fused_attention import attend, masked_rows_fill, merge_heads
from kiln.ops.registry import OpImpl

if TYPE_CHECKING:
    from kiln.lowering.spec import KernelSpec

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


class SdpaChoice(Choice):
    op_types = ((KILN, "Attention"),)

    timed_only = True  # a back end suits some shapes only: chosen by timing, never by default

    def __init__(self, backend: str) -> None:
        self.id = f"sdpa-{backend}"
        self.backend = BACKENDS[backend]

    def supports(self, spec: KernelSpec, device: str) -> bool:
        return device == "cuda"

    def launch(self, recipe: Mapping[str, Any], reference: OpImpl) -> Launch:
        backend = self.backend

        def run(*inputs, masked_rows="nan", **attributes):
            try:
                with sdpa_kernel(backend):
                    y, mask = attend(*inputs, **attributes)
            except RuntimeError as error:
                if "No available kernel" not in str(error):
                    raise
                y, mask = attend(*inputs, **attributes)
            if mask is not None:
                fill_hidden_rows(y, mask, masked_rows_fill(masked_rows))
            return y if attributes.get("layout", "bsd") == "bhsd" else merge_heads(y)

        return Launch(with_fn(reference, run))


SDPA_CHOICES = [SdpaChoice(name) for name in BACKENDS]
