"""ImageDecoder: encoded image bytes (uint8) to an HxWxC uint8 tensor, decoded by Pillow."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch

from kiln.errors import InputError
from kiln.ops.registry import register


@register("ImageDecoder", since=20)
def image_decoder(encoded_stream: torch.Tensor, *, pixel_format: str = "RGB") -> torch.Tensor:
    # Decoding runs on the host whatever the device: no GPU decoder is assumed.
    data = encoded_stream.detach().cpu().numpy().tobytes()
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError) as error:
        raise InputError(f"ImageDecoder cannot decode its input: {error}") from None
    if pixel_format == "Grayscale":
        decoded = np.asarray(image.convert("L"))[:, :, None]
    else:
        decoded = np.asarray(image.convert("RGB"))
        if pixel_format == "BGR":
            decoded = decoded[:, :, ::-1]
    return torch.from_numpy(decoded.copy()).to(encoded_stream.device)
