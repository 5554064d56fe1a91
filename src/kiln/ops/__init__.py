"""ONNX operators as device-agnostic PyTorch functions.

They are the reference semantics, the constant folder, the CPU backend and the fallback choice on
the GPU. Importing this package registers every operator.
"""

from kiln.ops import (  # noqa: F401  (imported for their registrations)
    activation,
    attention,
    control_flow,
    conv,
    elementwise,
    fused_attention,
    fused_conv,
    fused_matmul,
    fused_norm,
    fused_pointwise,
    image,
    image_decoder,
    indexing,
    linalg,
    loss,
    ml,
    normalization,
    quantization,
    quantized,
    random,
    reduce,
    rnn,
    sequence,
    shape,
    signal,
    text,
    training,
)
from kiln.ops.custom import custom_op
from kiln.ops.registry import OpImpl, Subgraph, lookup, register, registered_ops, supported_opsets

__all__ = [
    "OpImpl", "Subgraph", "custom_op", "lookup", "register", "registered_ops", "supported_opsets",
]
