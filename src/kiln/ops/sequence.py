"""Sequence and optional operators.

A sequence is a Python list of tensors and an empty optional is ``None``. Ops build new lists
rather than change their input, since a value may be read by several nodes. (SequenceMap runs a
subgraph and lives with the control-flow ops.)
"""

from __future__ import annotations

import torch

from kiln.errors import InputError
from kiln.ops.registry import register
from kiln.ops.shape import ints, moves_strings


@register("SequenceEmpty", since=11)
def sequence_empty(*, dtype=1):  # an empty list carries no element type to set
    return []


@register("SequenceConstruct", since=11)
def sequence_construct(*inputs):
    return list(inputs)


@register("SequenceInsert", since=11)
def sequence_insert(input_sequence, tensor, position=None):
    inserted = list(input_sequence)
    # list.insert counts negative positions from the back, as ONNX does.
    inserted.insert(len(inserted) if position is None else int(position.item()), tensor)
    return inserted


@register("SequenceAt", since=11)
def sequence_at(input_sequence, position):
    return input_sequence[int(position.item())]


@register("SequenceErase", since=11)
def sequence_erase(input_sequence, position=None):
    erased = list(input_sequence)
    del erased[-1 if position is None else int(position.item())]
    return erased


@register("SequenceLength", since=11)
def sequence_length(input_sequence, *, _device):
    return torch.tensor(len(input_sequence), dtype=torch.int64, device=_device)


@register("ConcatFromSequence", since=11)
@moves_strings
def concat_from_sequence(input_sequence, *, axis, new_axis=0):
    if new_axis:  # axis counts in the output's rank, as torch.stack's does
        return torch.stack(input_sequence, dim=axis)
    return torch.cat(input_sequence, dim=axis)


@register("SplitToSequence", since=11)
@moves_strings
def split_to_sequence(input, split=None, *, axis=0, keepdims=1):
    if split is None:  # parts of one along the axis; keepdims only applies here
        parts = torch.split(input, 1, dim=axis) if keepdims else torch.unbind(input, axis)
        return list(parts)
    # A scalar split is a part length (the last part may be shorter), a 1-D one the lengths.
    sizes = int(split.item()) if split.dim() == 0 else ints(split)
    return list(torch.split(input, sizes, dim=axis))


@register("Optional", since=15)
def optional(input=None, *, type=None):  # type only describes an empty optional; None needs none
    return input


@register("OptionalHasElement", since=15)
def optional_has_element(input=None, *, _device):
    return torch.tensor(input is not None, device=_device)


@register("OptionalGetElement", since=15)
def optional_get_element(input):
    if input is None:
        raise InputError("OptionalGetElement: the optional is empty, so it has no element to get")
    return input
