"""Multi-level RoIAlign (mmcv `RoIAlign`, avg pool) with a fixed sampling grid.

mmcv's default `sampling_ratio=0` samples each bin on an adaptive ceil(roi_h / 7) x
ceil(roi_w / 7) grid, whose size depends on the data and so cannot be static. Here every bin is
sampled on a fixed `sampling_ratio` x `sampling_ratio` grid (2 by default, Detectron's choice);
`tests/test_roi_align.py` checks the result against a numpy transcription of mmcv's kernel
(fixed and adaptive) and measures the difference on real feature maps.

RoIs are mapped to levels as `SingleRoIExtractor`: lvl = floor(log2(sqrt(w * h) / 56 + 1e-6)),
clipped to the levels given. All levels are flattened into one table per image so each sample
point is one gather, whatever level its RoI uses.
"""

import jax
import jax.numpy as jnp


def map_roi_levels(rois, num_levels, finest_scale=56.0, plus_one=False):
    """The pyramid level of each RoI.

    Args:
      rois: [..., 4] boxes (x1, y1, x2, y2) in canvas pixels.
      num_levels: L; levels are clipped to [0, L - 1].
      finest_scale: the scale mapped to level 0 (56).
      plus_one: use the legacy (x2 - x1 + 1) * (y2 - y1 + 1) area (DeFeat's gt-mask rule).
    Returns:
      [...] int32 levels.
    """
    extra = 1.0 if plus_one else 0.0
    w = rois[..., 2] - rois[..., 0] + extra
    h = rois[..., 3] - rois[..., 1] + extra
    scale = jnp.sqrt(jnp.maximum(w * h, 0.0))
    lvl = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(lvl, 0, num_levels - 1).astype(jnp.int32)


def _axis_samples(start, length, out_size, grid):
    """Sample coordinates along one axis: [R, out_size * grid] (bin-major)."""
    bin_size = length / out_size
    bins = jnp.arange(out_size, dtype=jnp.float32)
    sub = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
    offs = (bins[:, None] + sub[None, :]).reshape(-1)  # in bins
    return start[:, None] + offs[None, :] * bin_size[:, None]


def _bilinear_axis(coord, size):
    """mmcv's bilinear rule along one axis.

    Returns (low, high, w_low, w_high, inside): int32 indices, float weights, and whether the
    sample is inside [-1, size] (outside samples contribute 0).
    """
    size_f = size.astype(jnp.float32)
    inside = (coord >= -1.0) & (coord <= size_f)
    c = jnp.maximum(coord, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    c = jnp.where(at_end, low.astype(jnp.float32), c)
    frac = c - low.astype(jnp.float32)
    return low, high, 1.0 - frac, frac, inside


def roi_align(
    feats, strides, rois, *, output_size=7, sampling_ratio=2, aligned=True, finest_scale=56.0
):
    """RoIAlign of one image's RoIs on the level each maps to.

    Args:
      feats: list of L arrays [H_l, W_l, C] (P2..P5 for Faster R-CNN).
      strides: the L level strides.
      rois: [R, 4] boxes in canvas pixels; treated as constants (no gradient flows to them).
      output_size: the pooled size (7).
      sampling_ratio: samples per bin along each axis (static; see the module docstring).
      aligned: mmcv `aligned=True` (shift by -0.5 pixel, no minimum size) or the legacy
        behaviour (no shift, RoI sizes at least 1 pixel).
      finest_scale: the level-mapping scale (56).
    Returns:
      [R, output_size, output_size, C] pooled features.
    """
    rois = jax.lax.stop_gradient(rois.astype(jnp.float32))
    c = feats[0].shape[-1]
    sizes = [f.shape[:2] for f in feats]
    offsets, total = [], 0
    for h, w in sizes:
        offsets.append(total)
        total += h * w
    table = jnp.concatenate([f.reshape(-1, c) for f in feats], axis=0)
    lvl = map_roi_levels(rois, len(feats), finest_scale)
    scale = 1.0 / jnp.asarray(strides, jnp.float32)[lvl]
    hl = jnp.asarray([s[0] for s in sizes], jnp.int32)[lvl]
    wl = jnp.asarray([s[1] for s in sizes], jnp.int32)[lvl]
    base = jnp.asarray(offsets, jnp.int32)[lvl]
    shift = 0.5 if aligned else 0.0
    x1 = rois[:, 0] * scale - shift
    y1 = rois[:, 1] * scale - shift
    rw = (rois[:, 2] - rois[:, 0]) * scale
    rh = (rois[:, 3] - rois[:, 1]) * scale
    if not aligned:
        rw = jnp.maximum(rw, 1.0)
        rh = jnp.maximum(rh, 1.0)
    g = sampling_ratio
    ys = _axis_samples(y1, rh, output_size, g)  # [R, S]
    xs = _axis_samples(x1, rw, output_size, g)
    y0, y1i, wy0, wy1, iny = _bilinear_axis(ys, hl[:, None])
    x0, x1i, wx0, wx1, inx = _bilinear_axis(xs, wl[:, None])
    ok = (iny[:, :, None] & inx[:, None, :]).astype(table.dtype)  # [R, S, S]

    def corner(yi, xi, wy, wx):
        idx = base[:, None, None] + yi[:, :, None] * wl[:, None, None] + xi[:, None, :]
        weight = (wy[:, :, None] * wx[:, None, :]).astype(table.dtype) * ok
        return table[idx] * weight[..., None]

    out = (
        corner(y0, x0, wy0, wx0)
        + corner(y0, x1i, wy0, wx1)
        + corner(y1i, x0, wy1, wx0)
        + corner(y1i, x1i, wy1, wx1)
    )  # [R, S, S, C]
    r = rois.shape[0]
    out = out.reshape(r, output_size, g, output_size, g, c)
    return out.mean(axis=(2, 4))
