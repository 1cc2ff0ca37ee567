"""Box geometry: IoU and the mmdetection 2.x DeltaXYWH coder.

Boxes are (x1, y1, x2, y2) in continuous pixel coordinates with width = x2 - x1 (mmdetection's
coordinate system, `specs/detectors.md` §1.9). Every function is batched by broadcasting over
leading axes and has static shapes.
"""

import math

import jax.numpy as jnp

# mmdetection clamps dw, dh to +-|log(16 / 1000)| when decoding (delta_xywh_bbox_coder.py).
WH_RATIO_CLIP = 16 / 1000
IOU_EPS = 1e-6


def area(boxes):
    """Box areas. boxes: [..., 4] -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(a, b, eps=IOU_EPS):
    """IoU of every box in `a` with every box in `b`, as mmdetection's `bbox_overlaps`.

    Args:
      a: [..., N, 4] boxes.
      b: [..., M, 4] boxes.
      eps: the union is clamped to at least `eps`.
    Returns:
      [..., N, M] IoU.
    """
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return inter / jnp.maximum(union, eps)


def aligned_iou(a, b, eps=IOU_EPS):
    """IoU of a[i] with b[i]. a, b: [..., 4] -> [...]."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    return inter / jnp.maximum(union, eps)


def encode_deltas(priors, gts, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
    """DeltaXYWH encode: the regression target that moves `priors` onto `gts`.

    Args:
      priors: [..., 4] anchor or proposal boxes.
      gts: [..., 4] target boxes (broadcastable with priors).
      means, stds: per-coordinate normalisation, (dx, dy, dw, dh).
    Returns:
      [..., 4] deltas (dx, dy, dw, dh), normalised by means and stds.
    """
    pw = priors[..., 2] - priors[..., 0]
    ph = priors[..., 3] - priors[..., 1]
    px = (priors[..., 0] + priors[..., 2]) * 0.5
    py = (priors[..., 1] + priors[..., 3]) * 0.5
    gw = gts[..., 2] - gts[..., 0]
    gh = gts[..., 3] - gts[..., 1]
    gx = (gts[..., 0] + gts[..., 2]) * 0.5
    gy = (gts[..., 1] + gts[..., 3]) * 0.5
    deltas = jnp.stack(
        [(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1
    )
    return (deltas - jnp.asarray(means, deltas.dtype)) / jnp.asarray(stds, deltas.dtype)


def decode_deltas(
    priors, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), max_shape=None
):
    """DeltaXYWH decode, with mmdetection's dw/dh clamp and optional clipping.

    Args:
      priors: [..., 4] anchor or proposal boxes.
      deltas: [..., 4] normalised deltas.
      means, stds: as in `encode_deltas`.
      max_shape: optional [..., 2] (height, width) of the resized, unpadded image, broadcastable
        to priors[..., 0]; x is clipped to [0, width] and y to [0, height].
    Returns:
      [..., 4] boxes.
    """
    d = deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means, deltas.dtype)
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dw = jnp.clip(d[..., 2], -max_ratio, max_ratio)
    dh = jnp.clip(d[..., 3], -max_ratio, max_ratio)
    pw = priors[..., 2] - priors[..., 0]
    ph = priors[..., 3] - priors[..., 1]
    px = (priors[..., 0] + priors[..., 2]) * 0.5
    py = (priors[..., 1] + priors[..., 3]) * 0.5
    cx = px + pw * d[..., 0]
    cy = py + ph * d[..., 1]
    w = pw * jnp.exp(dw)
    h = ph * jnp.exp(dh)
    boxes = jnp.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], axis=-1)
    if max_shape is not None:
        boxes = clip_boxes(boxes, max_shape)
    return boxes


def clip_boxes(boxes, max_shape):
    """Clips x to [0, width] and y to [0, height].

    Args:
      boxes: [..., 4].
      max_shape: [..., 2] (height, width), broadcastable to boxes[..., 0].
    Returns:
      [..., 4] clipped boxes.
    """
    h = max_shape[..., 0].astype(boxes.dtype)
    w = max_shape[..., 1].astype(boxes.dtype)
    return jnp.stack(
        [
            jnp.clip(boxes[..., 0], 0.0, w),
            jnp.clip(boxes[..., 1], 0.0, h),
            jnp.clip(boxes[..., 2], 0.0, w),
            jnp.clip(boxes[..., 3], 0.0, h),
        ],
        axis=-1,
    )


def distance_to_box(points, distances, max_shape=None):
    """mmdetection `distance2bbox`: (x - l, y - t, x + r, y + b), optionally clipped.

    Args:
      points: [..., 2] (x, y).
      distances: [..., 4] (left, top, right, bottom).
      max_shape: optional [..., 2] (height, width) to clip to.
    Returns:
      [..., 4] boxes.
    """
    x, y = points[..., 0], points[..., 1]
    boxes = jnp.stack(
        [
            x - distances[..., 0],
            y - distances[..., 1],
            x + distances[..., 2],
            y + distances[..., 3],
        ],
        axis=-1,
    )
    return boxes if max_shape is None else clip_boxes(boxes, max_shape)


def box_to_distance(points, boxes, max_dis=None, eps=0.1):
    """mmdetection `bbox2distance`: (x - x1, y - y1, x2 - x, y2 - y), clamped to
    [0, max_dis - eps] when max_dis is given. points: [..., 2], boxes: [..., 4] -> [..., 4]."""
    d = jnp.stack(
        [
            points[..., 0] - boxes[..., 0],
            points[..., 1] - boxes[..., 1],
            boxes[..., 2] - points[..., 0],
            boxes[..., 3] - points[..., 1],
        ],
        axis=-1,
    )
    if max_dis is not None:
        d = jnp.clip(d, 0.0, max_dis - eps)
    return d


def centers(boxes):
    """Box centres. [..., 4] -> [..., 2]."""
    return jnp.stack(
        [(boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5], axis=-1
    )
