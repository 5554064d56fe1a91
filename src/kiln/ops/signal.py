"""Signal-processing operators: DFT, STFT, window functions and the mel filter bank.

ONNX carries complex values as real tensors whose last dimension holds ``[real]`` (length 1) or
``[real, imaginary]`` (length 2). These functions convert to torch complex tensors, call
``torch.fft`` and convert back. FFTs run in float32 (float64 for double inputs) because torch has
no CPU kernels for half-precision FFTs.
"""

from __future__ import annotations

import math

import torch

from kiln.ops.dtypes import torch_dtype
from kiln.ops.registry import register


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1]`` or ``[..., 2]`` real layout -> real or complex tensor without the last dim."""
    x = x.to(_fft_dtype(x.dtype))
    if x.shape[-1] == 1:
        return x[..., 0]
    return torch.complex(x[..., 0], x[..., 1])


def _dft(
    x: torch.Tensor, dft_length: int | None, axis: int, inverse: bool, onesided: bool
) -> torch.Tensor:
    axis %= x.dim()  # counted on the full rank, so -2 is the last signal axis
    signal = _as_complex(x)
    if dft_length is None:
        # IRFFT reconstructs an even-length signal from its one-sided spectrum by default.
        dft_length = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    if inverse and onesided:
        real = torch.fft.irfft(signal, n=dft_length, dim=axis)
        return real.unsqueeze(-1).to(x.dtype)
    if inverse:
        spectrum = torch.fft.ifft(signal, n=dft_length, dim=axis)
    elif onesided and not signal.is_complex():
        spectrum = torch.fft.rfft(signal, n=dft_length, dim=axis)
    else:
        spectrum = torch.fft.fft(signal, n=dft_length, dim=axis)
        if onesided:
            spectrum = spectrum.narrow(axis, 0, dft_length // 2 + 1)
    return torch.stack([spectrum.real, spectrum.imag], dim=-1).to(x.dtype)


def _optional_int(value: torch.Tensor | None) -> int | None:
    return None if value is None else int(value)


@register("DFT", since=17)
def dft_17(
    input: torch.Tensor,
    dft_length: torch.Tensor | None = None,
    *,
    axis: int = 1,
    inverse: int = 0,
    onesided: int = 0,
) -> torch.Tensor:
    return _dft(input, _optional_int(dft_length), axis, bool(inverse), bool(onesided))


@register("DFT", since=20)
def dft_20(
    input: torch.Tensor,
    dft_length: torch.Tensor | None = None,
    axis: torch.Tensor | None = None,
    *,
    inverse: int = 0,
    onesided: int = 0,
) -> torch.Tensor:
    axis_value = -2 if axis is None else int(axis)
    return _dft(input, _optional_int(dft_length), axis_value, bool(inverse), bool(onesided))


@register("STFT", since=17)
def stft(
    signal: torch.Tensor,
    frame_step: torch.Tensor,
    window: torch.Tensor | None = None,
    frame_length: torch.Tensor | None = None,
    *,
    onesided: int = 1,
) -> torch.Tensor:
    if frame_length is not None:
        length = int(frame_length)
    elif window is not None:
        length = window.shape[0]
    else:
        length = signal.shape[1]
    # [batch, frames, components, length] -> [batch, frames, length, components]
    frames = signal.unfold(1, length, int(frame_step)).transpose(-1, -2)
    if window is not None:
        frames = frames * window.to(frames.dtype).unsqueeze(-1)
    return _dft(frames, None, axis=2, inverse=False, onesided=bool(onesided))


def _window(size: torch.Tensor, periodic: int, output_datatype: int, terms: list[float]):
    """Cosine-sum window ``sum_k (-1)^k a_k cos(2 pi k n / N)``, N = size (periodic) or size - 1."""
    length = int(size)
    denominator = length if periodic else length - 1
    n = torch.arange(length, dtype=torch.float64, device=size.device)
    phase = 2 * math.pi * n / denominator
    window = sum((-1) ** k * a * torch.cos(k * phase) for k, a in enumerate(terms))
    return window.to(torch_dtype(output_datatype))


@register("HannWindow", since=17)
def hann_window(size: torch.Tensor, *, periodic: int = 1, output_datatype: int = 1):
    return _window(size, periodic, output_datatype, [0.5, 0.5])


@register("HammingWindow", since=17)
def hamming_window(size: torch.Tensor, *, periodic: int = 1, output_datatype: int = 1):
    alpha = 25.0 / 46.0  # the exact optimum ONNX specifies, rather than the rounded 0.54
    return _window(size, periodic, output_datatype, [alpha, 1.0 - alpha])


@register("BlackmanWindow", since=17)
def blackman_window(size: torch.Tensor, *, periodic: int = 1, output_datatype: int = 1):
    return _window(size, periodic, output_datatype, [0.42, 0.5, 0.08])


def _hertz_to_mel(hertz: torch.Tensor) -> torch.Tensor:
    # log1p in the input's own precision, as the ONNX reference does, so bin edges round alike.
    return (2595 * torch.log1p(hertz / 700)).double() / math.log(10)


@register("MelWeightMatrix", since=17)
def mel_weight_matrix(
    num_mel_bins: torch.Tensor,
    dft_length: torch.Tensor,
    sample_rate: torch.Tensor,
    lower_edge_hertz: torch.Tensor,
    upper_edge_hertz: torch.Tensor,
    *,
    output_datatype: int = 1,
) -> torch.Tensor:
    """Triangular filters peaking at 1: one column per mel bin, ``dft_length // 2 + 1`` rows."""
    mel_bins, length, rate = int(num_mel_bins), int(dft_length), int(sample_rate)
    device = lower_edge_hertz.device
    low_mel, high_mel = _hertz_to_mel(lower_edge_hertz), _hertz_to_mel(upper_edge_hertz)
    mel_step = (high_mel - low_mel) / (mel_bins + 2)
    mels = torch.arange(mel_bins + 2, dtype=torch.float64, device=device) * mel_step + low_mel
    hertz = 700 * torch.expm1(mels / 2595 * math.log(10))
    edges = torch.floor((length + 1) * hertz / rate).long()  # spectrogram bin of each edge

    left, center, right = edges[:-2], edges[1:-1], edges[2:]  # one per mel bin (column)
    j = torch.arange(length // 2 + 1, device=device).unsqueeze(1)  # spectrogram bin (row)
    rising = (j - left) / (center - left).clamp(min=1)
    falling = (right - j) / (right - center).clamp(min=1)
    in_rise = (j >= left) & (j <= center)
    in_fall = (j >= center) & (j < right)
    weights = torch.where(in_fall, falling, torch.where(in_rise, rising, 0.0))
    # A filter whose left and center edges coincide peaks at its center bin.
    weights = torch.where((j == center) & (left == center), 1.0, weights)
    return weights.to(torch_dtype(output_datatype))
