"""Image operators: Resize/Upsample, GridSample, AffineGrid, RoiAlign and NonMaxSuppression.

Resize follows the ONNX reference implementation: it is separable, so each resized axis is handled
on its own by gathering the few source elements every output position needs and weighting them.
Sampling positions and weights depend only on shapes and scales, so they are computed on the host
with the reference's precision (float64; cubic weights float32) and moved to the data's device.
Nearest-neighbour sampling is a pure gather, exact for every element type. Resize-10 and Upsample
leave rounding unspecified and follow onnxruntime.

GridSample gathers the interpolation taps of every dimension directly instead of calling
``torch.nn.functional.grid_sample``, whose bicubic border/reflection handling and missing volumetric
bicubic differ from ONNX.
"""

from __future__ import annotations

import itertools
import math

import torch

from kiln.ops.registry import register

# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------


def _source_coordinates(
    mode: str, out_size: int, in_size: int, scale: float, roi: tuple[float, float] | None
) -> torch.Tensor:
    """Where each output position along one axis samples the input."""
    y = torch.arange(out_size, dtype=torch.float64)
    out_length = scale * in_size  # the unrounded output length
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        # Keeps the centre of the input on the centre of the output when out_size was rounded.
        offset = in_size / 2 * (1 - out_size / out_length)
        return offset + (y + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (y + 0.5) / scale - 0.5 if out_length != 1 else torch.full_like(y, -0.5)
    if mode == "align_corners":
        return y * (in_size - 1) / (out_length - 1) if out_length != 1 else torch.zeros_like(y)
    if mode == "asymmetric":
        return y / scale
    if mode == "tf_crop_and_resize":
        start, end = roi if roi is not None else (0.0, 1.0)
        if out_length == 1:
            x = torch.full_like(y, (end - start) * (in_size - 1) / 2)
        else:
            x = y * (end - start) * (in_size - 1) / (out_length - 1)
        return x + start * (in_size - 1)
    raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")


def _nearest_index(x: torch.Tensor, nearest_mode: str) -> torch.Tensor:
    """The input index nearest to each source coordinate, ties broken as ``nearest_mode`` says."""
    floor = torch.floor(x)
    fraction = x - floor
    if nearest_mode == "round_prefer_floor":
        index = torch.where(fraction <= 0.5, floor, floor + 1)
    elif nearest_mode == "round_prefer_ceil":
        index = torch.where(fraction < 0.5, floor, floor + 1)
    elif nearest_mode == "floor":
        index = floor
    elif nearest_mode == "ceil":
        index = torch.ceil(x)
    else:
        raise ValueError(f"unknown nearest_mode {nearest_mode!r}")
    return index.to(torch.int64)


def _cubic_kernel(distance: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter ``a``."""
    d = distance.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _interpolation_weights(
    ratio: torch.Tensor, scale: float, mode: str, cubic_coeff_a: float, antialias: int
) -> torch.Tensor:
    """Weights (out, taps) of the taps around each coordinate; ``ratio`` is its offset in (0, 1]."""
    r = ratio.unsqueeze(1)
    if antialias and scale < 1:
        # Downsampling with antialias stretches the kernel by 1/scale (and renormalises it).
        support = 1 if mode == "linear" else 2
        first = math.floor(-support / scale) + 1
        offsets = torch.arange(first, 2 - first, dtype=torch.float64)
        distance = (offsets - r) * scale
        if mode == "linear":
            weights = torch.clamp(1 - distance.abs(), 0, 1)
        else:
            weights = _cubic_kernel(distance.float(), cubic_coeff_a)
        return (weights / weights.sum(dim=1, keepdim=True)).double()
    if mode == "linear":
        return torch.cat([1 - r, r], dim=1)
    # Cubic weights are float32, like the reference's (its float32 coefficient ``a`` decides).
    distance = torch.arange(-1, 3, dtype=torch.float64) - r
    return _cubic_kernel(distance.float(), cubic_coeff_a).double()


def _tap_indices(x: torch.Tensor, taps: int) -> torch.Tensor:
    """The ``taps`` input indices nearest each coordinate (ties to the lower ones), unclamped.

    Mirrors the reference's choice of neighbours so weights and taps line up exactly.
    """
    pad = math.ceil(taps / 2)
    shifted = x + pad
    base = torch.floor(shifted)
    fraction = shifted - base
    if taps % 2 == 0:
        offset = torch.where(fraction == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        lowest = -((taps - 1) // 2)
        offset = torch.where(fraction <= 0.5, lowest, lowest + 1)
    start = base.to(torch.int64) + offset
    return start.unsqueeze(1) + torch.arange(taps).unsqueeze(0) - pad


def _resize_axis(
    data: torch.Tensor,
    axis: int,
    out_size: int,
    scale: float,
    roi: tuple[float, float] | None,
    *,
    mode: str,
    coordinate_transformation_mode: str,
    nearest_mode: str,
    cubic_coeff_a: float,
    exclude_outside: int,
    extrapolation_value: float,
    antialias: int,
) -> torch.Tensor:
    """Resize ``data`` along one axis (already in its compute dtype unless ``mode`` is nearest)."""
    in_size = data.shape[axis]
    x = _source_coordinates(coordinate_transformation_mode, out_size, in_size, scale, roi)
    if mode == "nearest":
        index = _nearest_index(x, nearest_mode).clamp(0, in_size - 1)
        result = data.index_select(axis, index.to(data.device))
    else:
        floor = torch.floor(x)
        ratio = torch.where(x == floor, torch.ones_like(x), x - floor)
        weights = _interpolation_weights(ratio, scale, mode, cubic_coeff_a, antialias)
        taps = _tap_indices(x, weights.shape[1])
        if exclude_outside:
            outside = (taps < 0) | (taps >= in_size)
            weights = torch.where(outside, torch.zeros_like(weights), weights)
            total = weights.sum(dim=1, keepdim=True)
            weights = weights / torch.where(total == 0, torch.ones_like(total), total)
        gathered = data.index_select(axis, taps.clamp(0, in_size - 1).flatten().to(data.device))
        gathered = gathered.unflatten(axis, tuple(taps.shape))  # axis -> (out, taps)
        weight_view = [1] * data.dim()
        weight_view[axis : axis + 1] = list(weights.shape)
        weights = weights.to(device=data.device, dtype=data.dtype).reshape(weight_view)
        result = (gathered * weights).sum(dim=axis + 1)
    if coordinate_transformation_mode == "tf_crop_and_resize":
        outside = (x < 0) | (x > in_size - 1)
        if bool(outside.any()):
            view = [1] * data.dim()
            view[axis] = out_size
            fill = torch.full((), extrapolation_value, dtype=result.dtype, device=result.device)
            result = torch.where(outside.to(result.device).reshape(view), fill, result)
    return result


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float inputs interpolate in float32 (float64 stays float64); integers in float64, so that
    results round to the same integers as the reference's float64 computation."""
    if dtype.is_floating_point and dtype != torch.float64:
        return torch.float32
    return torch.float64


def _saturate_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast interpolated values back, rounding (half to even) and clamping as the reference does."""
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        return values.clamp(info.min, info.max).to(dtype)
    if dtype == torch.bool:
        return values != 0
    info = torch.iinfo(dtype)
    return torch.round(values).clamp(info.min, info.max).to(dtype)


def _resize(
    X: torch.Tensor,
    scales: list[float],
    sizes: list[int],
    rois: list[tuple[float, float] | None],
    *,
    mode: str,
    **options,
) -> torch.Tensor:
    """Resize every axis whose output size, scale or roi asks for it."""
    result = X if mode == "nearest" else X.to(_compute_dtype(X.dtype))
    for axis in range(X.dim()):
        roi = rois[axis]
        identity_roi = roi is None or (math.isclose(roi[0], 0.0) and math.isclose(roi[1], 1.0))
        if math.isclose(scales[axis], 1.0) and sizes[axis] == X.shape[axis] and identity_roi:
            continue
        result = _resize_axis(result, axis, sizes[axis], scales[axis], roi, mode=mode, **options)
    return result if mode == "nearest" else _saturate_to(result, X.dtype)


def _host_list(tensor: torch.Tensor | None) -> list | None:
    """A shape-defining input as a Python list (None when omitted or empty)."""
    if tensor is None or tensor.numel() == 0:
        return None
    return tensor.cpu().tolist()


@register("Resize", since=11, host_inputs=(1, 2, 3))
def resize(
    X, roi=None, scales=None, sizes=None, *,
    antialias=0, axes=None, coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75,
    exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
    mode="nearest", nearest_mode="round_prefer_floor",
):
    rank = X.dim()
    axes = [a % rank for a in axes] if axes else list(range(rank))
    roi_values, scale_values, size_values = _host_list(roi), _host_list(scales), _host_list(sizes)

    rois: list[tuple[float, float] | None] = [None] * rank
    if roi_values is not None and coordinate_transformation_mode == "tf_crop_and_resize":
        for i, axis in enumerate(axes):
            rois[axis] = (roi_values[i], roi_values[len(axes) + i])

    out_sizes = list(X.shape)
    axis_scales = [1.0] * rank
    if size_values is not None:
        ratios = [size_values[i] / X.shape[axis] for i, axis in enumerate(axes)]
        if keep_aspect_ratio_policy != "stretch":
            # One common scale for all axes, fitting inside (not_larger) or around (not_smaller).
            common = min(ratios) if keep_aspect_ratio_policy == "not_larger" else max(ratios)
            ratios = [common] * len(axes)
            size_values = [int(common * X.shape[axis] + 0.5) for axis in axes]
        for i, axis in enumerate(axes):
            axis_scales[axis], out_sizes[axis] = ratios[i], size_values[i]
    else:
        for i, axis in enumerate(axes):
            axis_scales[axis] = scale_values[i]
            out_sizes[axis] = int(scale_values[i] * X.shape[axis])

    return _resize(
        X, axis_scales, out_sizes, rois,
        mode=mode, coordinate_transformation_mode=coordinate_transformation_mode,
        nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
        extrapolation_value=extrapolation_value, antialias=antialias,
    )


def _resize_by_scales_v10(X: torch.Tensor, scales: list[float], mode: str) -> torch.Tensor:
    """Resize-10 and Upsample: asymmetric coordinates; nearest rounds down when enlarging an axis
    and up when shrinking it (as onnxruntime does; these versions leave rounding unspecified)."""
    sizes = [int(s * n) for s, n in zip(scales, X.shape)]
    if sizes == list(X.shape):  # onnxruntime copies the input whenever the shape is unchanged
        return X
    result = X if mode == "nearest" else X.to(_compute_dtype(X.dtype))
    for axis, (scale, size) in enumerate(zip(scales, sizes)):
        if scale == 1 and size == X.shape[axis]:
            continue
        result = _resize_axis(
            result, axis, size, scale, None,
            mode="nearest" if mode == "nearest" else "linear",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor" if scale >= 1 else "ceil",
            cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0,
        )
    return result if mode == "nearest" else _saturate_to(result, X.dtype)


@register("Resize", since=10, host_inputs=(1,))
def resize_v10(X, scales, *, mode="nearest"):
    return _resize_by_scales_v10(X, scales.cpu().tolist(), mode)


@register("Upsample", since=7)
def upsample_v7(X, *, mode="nearest", scales):
    return _resize_by_scales_v10(X, list(scales), mode)


@register("Upsample", since=9, host_inputs=(1,))
def upsample(X, scales, *, mode="nearest"):
    return _resize_by_scales_v10(X, scales.cpu().tolist(), mode)


# --------------------------------------------------------------------------------------------
# GridSample / AffineGrid
# --------------------------------------------------------------------------------------------


def _reflect(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Reflect coordinates at the borders ``low``/``high`` until they fall between them."""
    span = high - low
    if span <= 0:
        return torch.full_like(x, low)
    below, above = low - x, x - high
    distance = torch.where(x < low, below, above)
    folds = torch.trunc(distance / span)
    rest = distance - folds * span
    even = torch.remainder(folds, 2) == 0
    from_low = torch.where(even, low + rest, high - rest)
    from_high = torch.where(even, high - rest, low + rest)
    return torch.where(x < low, from_low, torch.where(x > high, from_high, x))


def _grid_taps(x: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(integer position, weight) of each interpolation tap along one dimension."""
    if mode == "nearest":
        return [(x, torch.ones_like(x))]
    floor = torch.floor(x)
    t = x - floor
    if mode == "linear":
        return [(floor, 1 - t), (floor + 1, t)]
    # Keys' cubic with a = -0.75, taps at floor-1 .. floor+2.
    return [(floor + k, _cubic_kernel(t - k, -0.75)) for k in (-1, 0, 1, 2)]


def _tap_index(
    position: torch.Tensor, size: int, padding_mode: str, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The in-range index of a tap and, for zero padding, whether it lies inside the input."""
    if padding_mode == "zeros":
        inside = (position >= 0) & (position < size)
        return position.clamp(0, size - 1).to(torch.int64), inside
    if padding_mode == "border":
        return position.clamp(0, size - 1).to(torch.int64), None
    return torch.trunc(_reflect(position, low, high)).clamp(0, size - 1).to(torch.int64), None


def _grid_sample(
    X: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: int
) -> torch.Tensor:
    batch, channels, *in_sizes = X.shape
    out_sizes = grid.shape[1:-1]
    coordinate_dtype = torch.promote_types(grid.dtype, torch.float32)
    # grid's last axis lists coordinates innermost dimension first (x, y, z).
    normalized = grid.to(coordinate_dtype).flip(-1).reshape(batch, -1, len(in_sizes))

    per_dim_taps, borders = [], []
    for d, size in enumerate(in_sizes):
        n = normalized[..., d]
        if align_corners:
            x, low, high = (n + 1) / 2 * (size - 1), 0.0, size - 1.0
        else:
            x, low, high = ((n + 1) * size - 1) / 2, -0.5, size - 0.5
        if mode == "nearest":
            x = torch.round(x)  # half to even, like the reference's rint
        if padding_mode == "border":
            x = torch.where((x < low) | (x > high), x.clamp(0, size - 1), x)
        elif padding_mode == "reflection":
            x = _reflect(x, low, high)
        per_dim_taps.append(_grid_taps(x, mode))
        borders.append((low, high))

    flat = X.reshape(batch, channels, -1)
    compute_dtype = torch.promote_types(X.dtype, torch.float32)
    result = torch.zeros(batch, channels, normalized.shape[1], dtype=compute_dtype, device=X.device)
    for combination in itertools.product(*per_dim_taps):
        linear_index = torch.zeros_like(normalized[..., 0], dtype=torch.int64)
        weight = torch.ones_like(normalized[..., 0])
        for d, (position, tap_weight) in enumerate(combination):
            index, inside = _tap_index(position, in_sizes[d], padding_mode, *borders[d])
            linear_index = linear_index * in_sizes[d] + index
            weight = weight * tap_weight
            if inside is not None:
                weight = weight * inside
        values = torch.gather(flat, 2, linear_index.unsqueeze(1).expand(-1, channels, -1))
        result = result + values.to(compute_dtype) * weight.unsqueeze(1).to(compute_dtype)
    return result.reshape(batch, channels, *out_sizes).to(X.dtype)


@register("GridSample", since=16)
def grid_sample_v16(X, grid, *, align_corners=0, mode="bilinear", padding_mode="zeros"):
    modes = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}
    return _grid_sample(X, grid, modes[mode], padding_mode, align_corners)


@register("GridSample", since=20)
def grid_sample(X, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    return _grid_sample(X, grid, mode, padding_mode, align_corners)


@register("AffineGrid", since=20)
def affine_grid(theta, size, *, align_corners=0):
    spatial = size.cpu().tolist()[2:]
    axes = []
    for n in spatial:  # normalized pixel centres (or corners) along each dimension
        if align_corners:
            axes.append(torch.linspace(-1, 1, n, dtype=torch.float64, device=theta.device))
        else:
            axes.append((torch.arange(n, dtype=torch.float64, device=theta.device) * 2 + 1) / n - 1)
    mesh = torch.meshgrid(*axes, indexing="ij")
    # Homogeneous coordinates, innermost dimension first: (x, y[, z], 1).
    points = torch.stack([*reversed(mesh), torch.ones_like(mesh[0])], dim=-1)
    grid = points.reshape(-1, len(spatial) + 1) @ theta.to(torch.float64).transpose(1, 2)
    return grid.reshape(theta.shape[0], *spatial, len(spatial)).to(theta.dtype)


# --------------------------------------------------------------------------------------------
# RoiAlign
# --------------------------------------------------------------------------------------------


def _bilinear_corners(coordinate: torch.Tensor, size: int):
    """Lower and upper neighbour and the fractional offset along one axis, as RoiAlign samples."""
    coordinate = coordinate.clamp(min=0)
    low = torch.floor(coordinate).to(torch.int64)
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coordinate = torch.where(at_edge, low.to(coordinate.dtype), coordinate)
    return low, high, coordinate - low


def _bin_samples(start, bin_size, samples, pooled: int, max_samples: int):
    """Sample coordinates (rois, pooled, max_samples) along one axis and which of them are real."""
    p = torch.arange(pooled, device=start.device, dtype=start.dtype).view(1, -1, 1)
    i = torch.arange(max_samples, device=start.device).view(1, 1, -1)
    bin_size, samples = bin_size.view(-1, 1, 1), samples.view(-1, 1, 1)
    positions = start.view(-1, 1, 1) + p * bin_size + (i + 0.5) * bin_size / samples.clamp(min=1)
    return positions, (i < samples).expand_as(positions)


def _roi_align_chunk(
    per_channel, height, width, batch_indices, start_h, start_w, bin_h, bin_w, grid_h, grid_w,
    *, mode: str, output_height: int, output_width: int,
):
    """RoiAlign of some rois: (rois, C, out_h, out_w) from ``per_channel`` (C, N*H*W) values."""
    max_h, max_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    y, y_real = _bin_samples(start_h, bin_h, grid_h, output_height, max_h)
    x, x_real = _bin_samples(start_w, bin_w, grid_w, output_width, max_w)
    # Broadcast everything to (rois, out_h, out_w, samples_h, samples_w).
    y, y_real = y[:, :, None, :, None], y_real[:, :, None, :, None]
    x, x_real = x[:, None, :, None, :], x_real[:, None, :, None, :]
    real = y_real & x_real
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)  # samples that read zeros
    shape = torch.broadcast_shapes(y.shape, x.shape)

    y_low, y_high, ly = _bilinear_corners(y, height)
    x_low, x_high, lx = _bilinear_corners(x, width)
    image_start = (batch_indices.to(torch.int64) * height * width).view(-1, 1, 1, 1, 1)

    def weighted_corner(yi, xi, weight):
        index = (image_start + yi * width + xi).expand(shape).reshape(-1)
        values = per_channel[:, index].reshape(-1, *shape)  # (C, rois, ...)
        weight = torch.where(outside, torch.zeros_like(weight), weight).expand(shape)
        return values * weight.to(values.dtype)

    corners = [
        weighted_corner(y_low, x_low, (1 - ly) * (1 - lx)),
        weighted_corner(y_low, x_high, (1 - ly) * lx),
        weighted_corner(y_high, x_low, ly * (1 - lx)),
        weighted_corner(y_high, x_high, ly * lx),
    ]
    if mode == "avg":
        total = torch.where(real, sum(corners), torch.zeros_like(corners[0])).sum(dim=(-2, -1))
        pooled = total / (grid_h * grid_w).clamp(min=1).view(1, -1, 1, 1)
    else:  # max: the largest weighted corner of each sample, then the largest sample (0 if none)
        largest = torch.stack(corners).amax(dim=0)
        largest = torch.where(real, largest, torch.full_like(largest, -math.inf)).amax(dim=(-2, -1))
        pooled = torch.where(torch.isneginf(largest), torch.zeros_like(largest), largest)
    return pooled.transpose(0, 1)


# Rois are processed in chunks so the gathered samples stay near this many elements.
_ROI_ALIGN_CHUNK_ELEMENTS = 1 << 24


def _roi_align(
    X, rois, batch_indices, *, half_pixel: bool, mode: str, output_height: int,
    output_width: int, sampling_ratio: int, spatial_scale: float,
):
    channels, height, width = X.shape[1:]
    compute_dtype = torch.promote_types(X.dtype, torch.float32)
    boxes = rois.to(compute_dtype) * spatial_scale - (0.5 if half_pixel else 0.0)
    start_w, start_h, end_w, end_h = boxes.unbind(1)
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not half_pixel:  # the legacy mode makes every roi at least one pixel wide
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / output_height, roi_w / output_width
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
    else:  # adaptive: about one sample per input pixel
        grid_h = torch.ceil(roi_h / output_height).to(torch.int64)
        grid_w = torch.ceil(roi_w / output_width).to(torch.int64)

    per_channel = X.to(compute_dtype).transpose(0, 1).reshape(channels, -1)
    num_rois = rois.shape[0]
    samples_per_roi = 1
    if num_rois:
        samples_per_roi = int(grid_h.clamp(min=1).max()) * int(grid_w.clamp(min=1).max())
    per_roi = 4 * channels * output_height * output_width * samples_per_roi
    chunk = max(1, _ROI_ALIGN_CHUNK_ELEMENTS // per_roi)
    pieces = [
        _roi_align_chunk(
            per_channel, height, width, batch_indices[i : i + chunk],
            start_h[i : i + chunk], start_w[i : i + chunk], bin_h[i : i + chunk],
            bin_w[i : i + chunk], grid_h[i : i + chunk], grid_w[i : i + chunk],
            mode=mode, output_height=output_height, output_width=output_width,
        )
        for i in range(0, num_rois, chunk)
    ]
    if not pieces:
        return X.new_zeros(0, channels, output_height, output_width)
    return torch.cat(pieces).to(X.dtype)


@register("RoiAlign", since=10)
def roi_align_v10(
    X, rois, batch_indices, *,
    mode="avg", output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0,
):
    return _roi_align(
        X, rois, batch_indices, half_pixel=False, mode=mode, output_height=output_height,
        output_width=output_width, sampling_ratio=sampling_ratio, spatial_scale=spatial_scale,
    )


@register("RoiAlign", since=16)
def roi_align(
    X, rois, batch_indices, *, coordinate_transformation_mode="half_pixel",
    mode="avg", output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0,
):
    return _roi_align(
        X, rois, batch_indices, half_pixel=coordinate_transformation_mode == "half_pixel",
        mode=mode, output_height=output_height, output_width=output_width,
        sampling_ratio=sampling_ratio, spatial_scale=spatial_scale,
    )


# --------------------------------------------------------------------------------------------
# NonMaxSuppression
# --------------------------------------------------------------------------------------------


def _box_corners(boxes: torch.Tensor, center_point_box: int) -> tuple[torch.Tensor, ...]:
    """(y_min, x_min, y_max, x_max) of each box."""
    if center_point_box:
        x_center, y_center, w, h = boxes.unbind(-1)
        return y_center - h / 2, x_center - w / 2, y_center + h / 2, x_center + w / 2
    y1, x1, y2, x2 = boxes.unbind(-1)  # corners in either order
    y_min, y_max = torch.minimum(y1, y2), torch.maximum(y1, y2)
    x_min, x_max = torch.minimum(x1, x2), torch.maximum(x1, x2)
    return y_min, x_min, y_max, x_max


def _pairwise_overlap(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Length of the intersection of every pair of intervals (negative when disjoint)."""
    return torch.minimum(high[:, None], high) - torch.maximum(low[:, None], low)


def _suppression_matrix(
    boxes: torch.Tensor, center_point_box: int, iou_threshold: float
) -> torch.Tensor:
    """suppresses[i, j]: boxes i and j overlap by more than the IoU threshold."""
    y_min, x_min, y_max, x_max = _box_corners(boxes, center_point_box)
    inter_w, inter_h = _pairwise_overlap(x_min, x_max), _pairwise_overlap(y_min, y_max)
    intersection = inter_w * inter_h
    area = (x_max - x_min) * (y_max - y_min)
    union = area[:, None] + area[None, :] - intersection
    overlaps = (inter_w > 0) & (inter_h > 0) & (intersection > 0)
    positive = (area[:, None] > 0) & (area[None, :] > 0) & (union > 0)
    return overlaps & positive & (intersection / union > iou_threshold)


def _greedy_select(order: list[int], suppresses: list[list[bool]], limit: int) -> list[int]:
    """Keep boxes in score order, skipping any that a kept box suppresses."""
    kept: list[int] = []
    for candidate in order:
        if len(kept) >= limit:
            break
        if not any(suppresses[candidate][k] for k in kept):
            kept.append(candidate)
    return kept


@register("NonMaxSuppression", since=10)
def non_max_suppression(
    boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None, *,
    center_point_box=0,
):
    # Selection is sequential and its output size data-dependent: it runs on the host.
    limit_values = _host_list(max_output_boxes_per_class)
    limit = max(int(limit_values[0]), 0) if limit_values else 0
    iou_values = _host_list(iou_threshold)
    iou = float(iou_values[0]) if iou_values else 0.0
    score_values = _host_list(score_threshold)
    selected: list[tuple[int, int, int]] = []
    if limit > 0:
        host_boxes, host_scores = boxes.cpu(), scores.cpu()
        for b in range(host_boxes.shape[0]):
            suppresses = _suppression_matrix(host_boxes[b], center_point_box, iou).tolist()
            for c in range(host_scores.shape[1]):
                class_scores = host_scores[b, c]
                # Highest score first; equal scores keep the lower box index first.
                order = torch.sort(class_scores, descending=True, stable=True).indices
                if score_values:
                    order = order[class_scores[order] > score_values[0]]
                kept = _greedy_select(order.tolist(), suppresses, limit)
                selected.extend((b, c, k) for k in kept)
    return torch.tensor(selected, dtype=torch.int64, device=boxes.device).reshape(-1, 3)
