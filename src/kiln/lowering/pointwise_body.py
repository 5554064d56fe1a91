"""The body of a ``kiln::Pointwise`` as plain data, so its spec says what the group computes.

A spec without it would describe every group of the same input and output types alike: they would
share one timing and one recipe, and a kernel generated for one would run for all.

Values get canonical names by position (inputs ``i0..``, inlined constants ``c0..``, node outputs
``v0..``), so equal groups anywhere in a model give equal specs and share one kernel::

    {"inputs": [{"dtype", "shape"}], "constants": [{"dtype", "shape", "data": base64}],
     "nodes": [{"op", "domain", "inputs", "outputs", "attributes"}], "types": {value: dtype},
     "outputs": [value]}

Constant data is little-endian bytes. Attributes are plain JSON values; one of another kind (a
tensor, a graph) is recorded as ``{"unsupported": kind}``.
"""

from __future__ import annotations

import base64
from typing import Any

import onnx_ir as ir

from kiln.ops.registry import normalize_domain

_PLAIN = {
    ir.AttributeType.INT: int,
    ir.AttributeType.FLOAT: float,
    ir.AttributeType.STRING: lambda v: v.decode() if isinstance(v, bytes) else v,
    ir.AttributeType.INTS: lambda v: [int(x) for x in v],
    ir.AttributeType.FLOATS: lambda v: [float(x) for x in v],
    ir.AttributeType.STRINGS: lambda v: [x.decode() if isinstance(x, bytes) else x for x in v],
}


def describe_body(body: ir.Graph) -> dict[str, Any]:
    names: dict[ir.Value, str] = {}
    inputs = []
    for value in body.inputs:
        names[value] = f"i{len(inputs)}"
        inputs.append(_type(value))
    constants, nodes, types = [], [], {}
    for node in body:
        tensor = _constant_tensor(node)
        if tensor is not None:
            names[node.outputs[0]] = f"c{len(constants)}"
            array = tensor.numpy()
            little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
            constants.append({
                "dtype": tensor.dtype.value,
                "shape": list(array.shape),
                "data": base64.b64encode(little_endian.tobytes()).decode("ascii"),
            })
            continue
        for value in node.outputs:
            names[value] = f"v{len(types)}"
            types[names[value]] = _type(value)["dtype"]
        nodes.append({
            "op": node.op_type,
            "domain": normalize_domain(node.domain),
            # a value from an enclosing scope has no name here: "?" makes the body unsupported
            "inputs": [None if v is None else names.get(v, "?") for v in node.inputs],
            "outputs": [names[v] for v in node.outputs],
            "attributes": {name: _plain(attr) for name, attr in node.attributes.items()},
        })
    return {
        "inputs": inputs,
        "constants": constants,
        "nodes": nodes,
        "types": types,
        "outputs": [names.get(v, "?") for v in body.outputs],
    }


def _type(value: ir.Value) -> dict[str, Any]:
    dtype = value.dtype.value if value.dtype is not None else 0
    shape = None if value.shape is None else [d if isinstance(d, int) else d.value for d in value.shape]
    return {"dtype": dtype, "shape": shape}


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if node.op_type != "Constant" or normalize_domain(node.domain) or list(node.attributes) != ["value"]:
        return None
    return node.attributes["value"].value


def _plain(attr: ir.Attr) -> Any:
    convert = _PLAIN.get(attr.type)
    return {"unsupported": attr.type.name} if convert is None else convert(attr.value)
