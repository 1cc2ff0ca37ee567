"""Anchor generation as mmdetection 2.x `AnchorGenerator`, and anchor valid flags.

Anchors depend only on the (static) canvas, so they are built with numpy at trace time and
enter the compiled step as constants. Valid flags depend on each image's padded size, which is
data, so they are computed with jnp.
"""

import math

import jax.numpy as jnp
import numpy as np


def feature_size(size, stride):
    """Spatial size of a feature map of `stride` for an input of `size` pixels.

    Every stride-2 layer in ResNet/FPN (7x7 pad 3, 3x3 pad 1, 1x1 pad 0, maxpool pad 1) gives
    ceil(n / 2), so a level of stride 2^k has ceil(size / 2^k) cells.
    """
    n = size
    for _ in range(int(round(math.log2(stride)))):
        n = -(-n // 2)
    return n


def base_anchors(base_size, scales, ratios, center_offset=0.0):
    """The A anchors of one location at the origin, ratio-major as mmdetection (a = r * S + s).

    Args:
      base_size: the level's base size (the stride for RetinaNet).
      scales: [S] multipliers of base_size.
      ratios: [R] height / width ratios.
      center_offset: 0 puts anchor centres on grid points (mmdetection's default).
    Returns:
      [R * S, 4] float32 boxes.
    """
    scales = np.asarray(scales, np.float32)
    ratios = np.asarray(ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
    c = center_offset * base_size
    return np.stack([c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs], axis=-1)


def grid_anchors(feat_hw, stride, base):
    """All anchors of one level in (y, x, a) row-major order.

    Args:
      feat_hw: (H, W) of the level's feature map.
      stride: the level's stride in pixels.
      base: [A, 4] anchors at the origin, from `base_anchors`.
    Returns:
      [H * W * A, 4] float32 boxes on the canvas.
    """
    h, w = feat_hw
    sx = np.arange(w, dtype=np.float32) * stride
    sy = np.arange(h, dtype=np.float32) * stride
    xx, yy = np.meshgrid(sx, sy)
    shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).astype(np.float32)


def multilevel_anchors(canvas_hw, strides, octave_base_scale, scales_per_octave, ratios):
    """Anchors of every level for a canvas, RetinaNet/GFL style (base_size = stride).

    Args:
      canvas_hw: (H, W) of the padded input canvas.
      strides: the level strides, e.g. (8, 16, 32, 64, 128).
      octave_base_scale, scales_per_octave: scales = base * 2^(i / per_octave).
      ratios: height / width ratios.
    Returns:
      list over levels of [H_l * W_l * A, 4] float32 numpy arrays.
    """
    scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
    out = []
    for s in strides:
        hw = (feature_size(canvas_hw[0], s), feature_size(canvas_hw[1], s))
        out.append(grid_anchors(hw, s, base_anchors(s, scales, ratios)))
    return out


def valid_flags(pad_shape, feat_hw, stride, num_anchors):
    """mmdetection's anchor valid flags: cells inside ceil(pad_shape / stride) are valid.

    `pad_shape` is each image's size padded to a multiple of 32, as mmdetection would have
    padded it; everything past it (our larger canvas) is invalid and never enters a loss.

    Args:
      pad_shape: [B, 2] int32 (height, width) per image.
      feat_hw: static (H, W) of the level.
      stride: the level stride.
      num_anchors: A, anchors per location.
    Returns:
      [B, H * W * A] bool.
    """
    h, w = feat_hw
    valid_h = jnp.minimum((pad_shape[:, 0] + stride - 1) // stride, h)
    valid_w = jnp.minimum((pad_shape[:, 1] + stride - 1) // stride, w)
    ys = jnp.arange(h)[None, :, None] < valid_h[:, None, None]
    xs = jnp.arange(w)[None, None, :] < valid_w[:, None, None]
    cell = ys & xs  # [B, H, W]
    return jnp.repeat(cell.reshape(cell.shape[0], -1), num_anchors, axis=1)
