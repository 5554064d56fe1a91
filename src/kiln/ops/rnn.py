"""Recurrent layers: RNN, GRU and LSTM (one layer, forward/reverse/bidirectional).

All three share one driver (:func:`_recurrent_layer`) that handles the ONNX plumbing: ``layout``,
directions, per-batch ``sequence_lens``, default initial states and biases. Each op only supplies
the cell: one time step from the input projection (``X @ W^T + Wb``, computed for all steps at once)
and the previous states to the new states.

One registration per op covers every opset: later versions only add types and the ``layout``
attribute, whose default keeps the old behaviour; the early ``output_sequence`` attribute does not
change what is computed (Y is produced whenever the node asks for it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kiln.ops.registry import register

Activation = Callable[[torch.Tensor], torch.Tensor]
# cell(input projection at t, previous states, direction parameters, activations) -> new states
Cell = Callable[..., tuple[torch.Tensor, ...]]

# Activation name (lower case) -> (function of x, alpha, beta; default alpha; default beta).
# alpha/beta are None for functions that take none; those consume nothing from the attribute lists.
_ACTIVATIONS: dict[str, tuple[Callable[..., torch.Tensor], float | None, float | None]] = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x >= a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0, 1), 0.2, 0.5),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)), 1.0, None),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), None, None),
    "softplus": (lambda x, a, b: F.softplus(x), None, None),
}


def _activation_functions(
    names: Sequence[str], alphas: Sequence[float] | None, betas: Sequence[float] | None
) -> list[Activation]:
    """Bind each activation to its alpha/beta, consumed in order by the functions taking them."""
    alpha_iter, beta_iter = iter(alphas or ()), iter(betas or ())
    functions = []
    for name in names:
        fn, default_alpha, default_beta = _ACTIVATIONS[name.lower()]
        alpha = next(alpha_iter, default_alpha) if default_alpha is not None else None
        beta = next(beta_iter, default_beta) if default_beta is not None else None
        functions.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
    return functions


def _per_direction_activations(
    activations: Sequence[str] | None,
    defaults: Sequence[str],
    num_directions: int,
    alphas: Sequence[float] | None,
    betas: Sequence[float] | None,
) -> list[list[Activation]]:
    names = list(activations) if activations else list(defaults) * num_directions
    if len(names) == len(defaults) and num_directions == 2:
        names = names * 2  # one set given for a bidirectional layer serves both directions
    functions = _activation_functions(names, alphas, betas)
    per = len(functions) // num_directions
    return [functions[d * per : (d + 1) * per] for d in range(num_directions)]


def _clipper(clip: float | None) -> Activation:
    """Clipping applied to every pre-activation, as the ``clip`` attribute asks."""
    if clip is None:
        return lambda x: x
    return lambda x: torch.clamp(x, -clip, clip)


def _reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of each batch entry of time-major ``x``."""
    if lengths is None:
        return torch.flip(x, [0])
    steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (seq, 1)
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (seq, batch)
    index = source.reshape(*source.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 0, index)


def _run_direction(
    cell: Cell,
    projected: torch.Tensor,
    initial_states: tuple[torch.Tensor, ...],
    lengths: torch.Tensor | None,
    reverse: bool,
    params: dict[str, torch.Tensor],
    activations: list[Activation],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run one direction over time; returns Y (seq, batch, hidden) and the final states."""
    if reverse:
        projected = _reverse_within_lengths(projected, lengths)
    states = initial_states
    outputs = []
    for t in range(projected.shape[0]):
        new_states = cell(projected[t], states, params, activations)
        if lengths is None:
            states = new_states
            outputs.append(new_states[0])
        else:
            # Batch entries whose sequence has ended keep their state and output zeros.
            active = (t < lengths).unsqueeze(1)
            states = tuple(torch.where(active, n, s) for n, s in zip(new_states, states))
            outputs.append(torch.where(active, new_states[0], torch.zeros_like(new_states[0])))
    if outputs:
        y = torch.stack(outputs)
    else:
        y = projected.new_zeros(0, *initial_states[0].shape)
    if reverse:
        y = _reverse_within_lengths(y, lengths)
    return y, states


def _recurrent_layer(
    cell: Cell,
    num_gates: int,
    default_activations: Sequence[str],
    X: torch.Tensor,
    W: torch.Tensor,
    R: torch.Tensor,
    B: torch.Tensor | None,
    sequence_lens: torch.Tensor | None,
    initial_states: Sequence[torch.Tensor | None],
    extra_params: dict[str, torch.Tensor],
    *,
    activations: Sequence[str] | None,
    activation_alpha: Sequence[float] | None,
    activation_beta: Sequence[float] | None,
    direction: str,
    layout: int,
) -> tuple[torch.Tensor, ...]:
    """Y and the final states (Y_h, then Y_c for LSTM) of a recurrent layer."""
    if layout == 1:  # batch-major -> time-major
        X = X.transpose(0, 1)
        initial_states = [s.transpose(0, 1) if s is not None else None for s in initial_states]
    num_directions, hidden = W.shape[0], R.shape[-1]
    batch = X.shape[1]
    if B is None:
        B = X.new_zeros(num_directions, 2 * num_gates * hidden)
    initial_states = [
        s if s is not None else X.new_zeros(num_directions, batch, hidden) for s in initial_states
    ]
    lengths = None
    if sequence_lens is not None:
        lengths = sequence_lens.to(device=X.device, dtype=torch.int64)
    if lengths is not None and bool((lengths == X.shape[0]).all()):
        lengths = None  # every sequence is full length: no masking needed
    per_direction = _per_direction_activations(
        activations, default_activations, num_directions, activation_alpha, activation_beta
    )
    reverse_flags = [direction == "reverse"] if num_directions == 1 else [False, True]

    ys, finals = [], []
    for d, reverse in enumerate(reverse_flags):
        w_bias, r_bias = B[d].split(num_gates * hidden)
        params = {"R": R[d], "r_bias": r_bias, **{k: v[d] for k, v in extra_params.items()}}
        projected = X @ W[d].T + w_bias  # input projection of every step at once
        y, states = _run_direction(
            cell, projected, tuple(s[d] for s in initial_states), lengths, reverse, params,
            per_direction[d],
        )
        ys.append(y)
        finals.append(states)
    Y = torch.stack(ys, dim=1)  # (seq, num_directions, batch, hidden)
    final_states = [torch.stack([f[i] for f in finals]) for i in range(len(initial_states))]
    if layout == 1:
        Y = Y.permute(2, 0, 1, 3)
        final_states = [s.transpose(0, 1) for s in final_states]
    return (Y, *final_states)


def _rnn_cell(clip: float | None) -> Cell:
    clipped = _clipper(clip)

    def step(x_proj, states, params, activations):
        (h,) = states
        f = activations[0]
        return (f(clipped(x_proj + h @ params["R"].T + params["r_bias"])),)

    return step


def _gru_cell(clip: float | None, linear_before_reset: int) -> Cell:
    clipped = _clipper(clip)

    def step(x_proj, states, params, activations):
        (h,) = states
        f, g = activations
        x_z, x_r, x_h = x_proj.chunk(3, dim=-1)
        r_z, r_r, r_h = params["R"].chunk(3, dim=0)
        rb_z, rb_r, rb_h = params["r_bias"].chunk(3)
        z = f(clipped(x_z + h @ r_z.T + rb_z))
        r = f(clipped(x_r + h @ r_r.T + rb_r))
        if linear_before_reset:
            candidate = g(clipped(x_h + r * (h @ r_h.T + rb_h)))
        else:
            candidate = g(clipped(x_h + (r * h) @ r_h.T + rb_h))
        return ((1 - z) * candidate + z * h,)

    return step


def _lstm_cell(clip: float | None, input_forget: int) -> Cell:
    clipped = _clipper(clip)

    def step(x_proj, states, params, activations):
        h, c = states
        f, g, act_h = activations
        gates = x_proj + h @ params["R"].T + params["r_bias"]
        gate_i, gate_o, gate_f, gate_c = gates.chunk(4, dim=-1)
        p_i, p_o, p_f = params["P"].chunk(3)
        i = f(clipped(gate_i + p_i * c))
        forget = 1 - i if input_forget else f(clipped(gate_f + p_f * c))
        new_c = forget * c + i * g(clipped(gate_c))
        o = f(clipped(gate_o + p_o * new_c))
        return o * act_h(new_c), new_c

    return step


@register("RNN", since=1)
def rnn(
    X, W, R, B=None, sequence_lens=None, initial_h=None, *,
    activation_alpha=None, activation_beta=None, activations=None, clip=None,
    direction="forward", hidden_size=None, layout=0, output_sequence=0,
):
    return _recurrent_layer(
        _rnn_cell(clip), 1, ["Tanh"], X, W, R, B, sequence_lens, [initial_h], {},
        activations=activations, activation_alpha=activation_alpha,
        activation_beta=activation_beta, direction=direction, layout=layout,
    )


@register("GRU", since=1)
def gru(
    X, W, R, B=None, sequence_lens=None, initial_h=None, *,
    activation_alpha=None, activation_beta=None, activations=None, clip=None,
    direction="forward", hidden_size=None, layout=0, linear_before_reset=0, output_sequence=0,
):
    return _recurrent_layer(
        _gru_cell(clip, linear_before_reset), 3, ["Sigmoid", "Tanh"], X, W, R, B, sequence_lens,
        [initial_h], {},
        activations=activations, activation_alpha=activation_alpha,
        activation_beta=activation_beta, direction=direction, layout=layout,
    )


@register("LSTM", since=1)
def lstm(
    X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
    activation_alpha=None, activation_beta=None, activations=None, clip=None,
    direction="forward", hidden_size=None, input_forget=0, layout=0, output_sequence=0,
):
    if P is None:
        P = X.new_zeros(W.shape[0], 3 * R.shape[-1])
    return _recurrent_layer(
        _lstm_cell(clip, input_forget), 4, ["Sigmoid", "Tanh", "Tanh"], X, W, R, B, sequence_lens,
        [initial_h, initial_c], {"P": P},
        activations=activations, activation_alpha=activation_alpha,
        activation_beta=activation_beta, direction=direction, layout=layout,
    )
