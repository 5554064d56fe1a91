"""Control flow: If, Loop, Scan and SequenceMap, running their graph attributes as Subgraphs."""

from __future__ import annotations

from typing import Any

import torch

from kiln.ops.registry import Subgraph, register


@register("If", since=1)
def if_(cond: torch.Tensor, *, then_branch: Subgraph, else_branch: Subgraph) -> tuple:
    branch = then_branch if bool(cond.reshape(-1)[0]) else else_branch
    return tuple(branch())


@register("Loop", since=1)
def loop(
    max_trip_count: torch.Tensor | None,
    condition: torch.Tensor | None,
    *carried: Any,
    body: Subgraph,
    _device: torch.device,
) -> tuple:
    trips = None if max_trip_count is None else int(max_trip_count.reshape(-1)[0])
    keep_going = True if condition is None else bool(condition.reshape(-1)[0])
    state = list(carried)
    scans: list[list[Any]] = []
    iteration = 0
    while keep_going and (trips is None or iteration < trips):
        outputs = body(
            torch.tensor(iteration, dtype=torch.int64, device=_device),
            torch.tensor(keep_going, device=_device),
            *state,
        )
        keep_going = bool(outputs[0].reshape(-1)[0])
        state = outputs[1 : 1 + len(state)]
        per_iteration = outputs[1 + len(state) :]
        if not scans:
            scans = [[] for _ in per_iteration]
        for collected, value in zip(scans, per_iteration):
            collected.append(value)
        iteration += 1
    scan_count = len(body.output_names) - 1 - len(state)
    stacked = [torch.stack(values) if values else torch.empty(0, device=_device) for values in scans]
    stacked += [torch.empty(0, device=_device)] * (scan_count - len(stacked))
    return (*state, *stacked)


@register("Scan", since=9)
def scan(
    *inputs: torch.Tensor,
    body: Subgraph,
    num_scan_inputs: int,
    scan_input_axes: list[int] | None = None,
    scan_input_directions: list[int] | None = None,
    scan_output_axes: list[int] | None = None,
    scan_output_directions: list[int] | None = None,
) -> tuple:
    state_count = len(inputs) - num_scan_inputs
    state, sequences = list(inputs[:state_count]), inputs[state_count:]
    in_axes = scan_input_axes or [0] * num_scan_inputs
    in_directions = scan_input_directions or [0] * num_scan_inputs
    sequences = [
        torch.movedim(s, axis % s.dim(), 0).flip(0) if direction else torch.movedim(s, axis % s.dim(), 0)
        for s, axis, direction in zip(sequences, in_axes, in_directions)
    ]
    length = sequences[0].shape[0] if sequences else 0
    scan_count = len(body.output_names) - state_count
    collected: list[list[torch.Tensor]] = [[] for _ in range(scan_count)]
    for step in range(length):
        outputs = body(*state, *(s[step] for s in sequences))
        state = outputs[:state_count]
        for values, value in zip(collected, outputs[state_count:]):
            values.append(value)
    out_axes = scan_output_axes or [0] * scan_count
    out_directions = scan_output_directions or [0] * scan_count
    results = []
    for values, axis, direction in zip(collected, out_axes, out_directions):
        stacked = torch.stack(values)
        if direction:
            stacked = stacked.flip(0)
        results.append(torch.movedim(stacked, 0, axis % stacked.dim()))
    return (*state, *results)


@register("Scan", since=8)
def scan_batched(
    sequence_lens: torch.Tensor | None,
    *inputs: torch.Tensor,
    body: Subgraph,
    num_scan_inputs: int,
    directions: list[int] | None = None,
) -> tuple:
    """Scan-8: axis 0 is a batch, axis 1 the scanned one; sequences may be shorter than axis 1."""
    batch = inputs[0].shape[0]
    lengths = [None] * batch if sequence_lens is None else [int(n) for n in sequence_lens.tolist()]
    per_item = []
    for index, length in enumerate(lengths):
        states = [x[index] for x in inputs[: len(inputs) - num_scan_inputs]]
        sequences = [x[index, :length] for x in inputs[len(inputs) - num_scan_inputs :]]
        per_item.append(
            scan(*states, *sequences, body=body, num_scan_inputs=num_scan_inputs,
                 scan_input_directions=directions)
        )
    return tuple(torch.stack(values) for values in zip(*per_item))


@register("SequenceMap", since=17)
def sequence_map(input_sequence: list, *additional: Any, body: Subgraph) -> tuple:
    outputs: list[list[Any]] = [[] for _ in body.output_names]
    for index, item in enumerate(input_sequence):
        extra = [a[index] if isinstance(a, list) else a for a in additional]
        for collected, value in zip(outputs, body(item, *extra)):
            collected.append(value)
    return tuple(outputs)
