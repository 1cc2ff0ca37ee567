"""Element-wise detection losses, as mmdetection 2.x computes them before reduction.

Each function returns the un-reduced loss; the caller multiplies by weights, sums and divides
by its normaliser (mmdetection's `weight_reduce_loss` with `avg_factor`).
"""

import jax
import jax.numpy as jnp


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
    b = x.shape[0]
    g = b if group_size in (0, None) or group_size >= b else group_size
    if b % g:
        raise ValueError(f"batch of {b} images does not split into groups of {g}")
    return x.reshape(b // g, -1).astype(jnp.float32).sum(axis=1)
