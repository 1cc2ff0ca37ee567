"""Element-wise detection losses, as mmdetection 2.x computes them before reduction.

Each function returns the un-reduced loss; the caller multiplies by weights, sums and divides
by its normaliser (mmdetection's `weight_reduce_loss` with `avg_factor`).
"""

import jax
import jax.numpy as jnp

from jdistill.ops import boxes as box_ops
from jdistill.ops import groups


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss per element: -alpha_t (1 - p_t)^gamma log p_t.

    As mmdetection's `py_sigmoid_focal_loss`: BCE-with-logits times the focal weight
    alpha_t * (1 - p_t)^gamma, where alpha_t = alpha on targets 1 and 1 - alpha on targets 0.

    Args:
      logits: [..., C] raw scores.
      targets: [..., C] one-hot (or soft) targets in [0, 1], broadcastable to logits.
      alpha, gamma: focal parameters.
    Returns:
      [..., C] float32 losses.
    """
    logits = logits.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    one_minus_pt = p * (1 - targets) + (1 - p) * targets
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return bce_with_logits(logits, targets) * alpha_t * one_minus_pt**gamma


def bce_with_logits(logits, targets):
    """Binary cross-entropy from logits, stable: softplus(x) - t * x. Shapes broadcast."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softplus(logits) - targets * logits


def l1_loss(pred, target):
    """|pred - target| per element. Shapes broadcast."""
    return jnp.abs(pred.astype(jnp.float32) - target)


def grouped_sum(x, group_size):
    """Sums over everything but the batch axis, per group of `group_size` consecutive images.

    mmdetection normalises each GPU's loss by that GPU's own count (2 images per GPU) and then
    averages gradients over GPUs. Summing per group of images and normalising each group
    separately reproduces that on any number of devices.

    Args:
      x: [B, ...] per-image values.
      group_size: images per group; 0 means one group of the whole batch.
    Returns:
      [B // group_size] (or [1]) float32 sums.
    """
    parts = groups.split(x, group_size)
    return parts.reshape(parts.shape[0], -1).astype(jnp.float32).sum(axis=1)


def quality_focal_loss(logits, labels, scores, *, beta=2.0):
    """GFL's quality focal loss per prior (mmdetection `quality_focal_loss`), summed over classes.

    Every (prior, class) entry is BCE(x, 0) * sigmoid(x)^beta, except a positive prior's
    gt-class entry: BCE(x, q) * |q - sigmoid(x)|^beta with q the IoU quality target.

    Args:
      logits: [..., C] joint class-quality logits.
      labels: [...] int class of positives; any value outside [0, C) marks a negative.
      scores: [...] quality targets q (IoU of the decoded box with its gt) at positives.
      beta: focusing exponent.
    Returns:
      [...] float32 loss per prior.
    """
    logits = logits.astype(jnp.float32)
    sig = jax.nn.sigmoid(logits)
    neg = bce_with_logits(logits, 0.0) * sig**beta
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # all zero when out of range
    q = scores[..., None].astype(jnp.float32)
    pos = bce_with_logits(logits, q) * jnp.abs(q - sig) ** beta
    return jnp.where(onehot > 0, pos, neg).sum(-1)


def distribution_focal_loss(logits, target):
    """GFL's distribution focal loss (mmdetection `distribution_focal_loss`).

    With l = floor(t): CE(logits, l) * (l + 1 - t) + CE(logits, l + 1) * (t - l).

    Args:
      logits: [..., R + 1] logits over the discretised distances 0..R.
      target: [...] float distances in [0, R - 0.1] (already clamped by the caller).
    Returns:
      [...] float32 loss.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    left = jnp.floor(target).astype(jnp.int32)
    right = left + 1
    w_left = right.astype(jnp.float32) - target
    w_right = target - left.astype(jnp.float32)
    ce_left = -jnp.take_along_axis(logp, left[..., None], axis=-1)[..., 0]
    ce_right = -jnp.take_along_axis(logp, right[..., None], axis=-1)[..., 0]
    return ce_left * w_left + ce_right * w_right


def giou_loss(pred, target, eps=1e-6):
    """1 - GIoU of aligned boxes, as mmdetection's `bbox_overlaps(mode='giou', is_aligned)`.

    Union and enclosing area are clamped to at least eps. pred, target: [..., 4] -> [...].
    """
    pred = pred.astype(jnp.float32)
    lt = jnp.maximum(pred[..., :2], target[..., :2])
    rb = jnp.minimum(pred[..., 2:], target[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    union = jnp.maximum(area_p + area_t - overlap, eps)
    ious = overlap / union
    e_wh = jnp.clip(
        jnp.maximum(pred[..., 2:], target[..., 2:]) - jnp.minimum(pred[..., :2], target[..., :2]),
        0.0,
    )
    enclose = jnp.maximum(e_wh[..., 0] * e_wh[..., 1], eps)
    return 1.0 - (ious - (enclose - union) / enclose)


def iou_log_loss(pred, target, eps=1e-6):
    """FCOS's IoU loss, mode 'log': -log(clamp(IoU, eps)). pred, target: [..., 4] -> [...]."""
    return -jnp.log(jnp.maximum(box_ops.aligned_iou(pred.astype(jnp.float32), target), eps))
