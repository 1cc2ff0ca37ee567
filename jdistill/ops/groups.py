"""Per-group statistics over the batch: mmdetection normalises per GPU of a few images and
averages over GPUs, which summing or averaging per group of consecutive images reproduces on
any number of devices."""

import jax.numpy as jnp


def split(x, group_size):
    """[N, ...] -> [N // g, g, ...] with g = group_size (0, None or >= N: one group of N).

    Raises ValueError when N does not split into groups of g.
    """
    n = x.shape[0]
    g = n if group_size in (0, None) or group_size >= n else group_size
    if n % g:
        raise ValueError(f"batch of {n} images does not split into groups of {g}")
    return x.reshape(n // g, g, *x.shape[1:])


def channel_stats(x, mask):
    """Per-channel mean and unbiased std over the counted cells of each group.

    x: [G, g, H, W, C] float32; mask: [G, g, H, W, 1] float32 (1 counts). Returns mean and std,
    each [G, 1, 1, 1, C]; std is 0 where fewer than 2 cells count (torch: NaN), and its
    gradient there is 0, not NaN.
    """
    axes = (1, 2, 3)
    cnt = mask.sum(axes, keepdims=True)
    mean = (mask * x).sum(axes, keepdims=True) / jnp.maximum(cnt, 1.0)
    var = (mask * jnp.square(x - mean)).sum(axes, keepdims=True) / jnp.maximum(cnt - 1.0, 1.0)
    # sqrt' is infinite at 0: take the root of a safe value so that a constant channel gets a
    # zero gradient instead of 0 * inf = NaN.
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
    return mean, std
