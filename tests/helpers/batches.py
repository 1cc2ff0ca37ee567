"""Batches for calling losses and heads directly, without the data pipeline."""


def crafted_batch(per_image, num_classes, seed=0, canvas=(64, 96)):
    """A training batch from per-image box lists (padded to the longest; random labels).

    Returns (batch dict of jnp arrays, boxes [B, G, 4] np, labels [B, G] np, valid [B, G] np).
    """
    import jax.numpy as jnp
    import numpy as np

    b, g = len(per_image), max(len(x) for x in per_image)
    boxes = np.zeros((b, g, 4), np.float32)
    valid = np.zeros((b, g), bool)
    labels = np.random.default_rng(seed).integers(0, num_classes, (b, g)).astype(np.int32)
    for i, bx in enumerate(per_image):
        if bx:
            boxes[i, : len(bx)] = bx
            valid[i, : len(bx)] = True
    batch = {
        "boxes": jnp.asarray(boxes),
        "labels": jnp.asarray(labels),
        "box_valid": jnp.asarray(valid),
        "pad_shape": jnp.tile(jnp.array(canvas), (b, 1)),
        "image_valid": jnp.ones(b, bool),
    }
    return batch, boxes, labels, valid


MAP_CANVAS = (64, 48)  # H, W in pixels of `nchw_maps` and `batch_of`: P3 is 8 x 6


def batch_of(n, pad_shape=None, canvas=MAP_CANVAS):
    """A batch of n valid images: `pad_shape` [N, 2] int32 (default every image `canvas`) and
    `image_valid`."""
    import jax.numpy as jnp
    import numpy as np

    ps = np.tile(np.array([canvas], np.int32), (n, 1)) if pad_shape is None else pad_shape
    return {"pad_shape": jnp.asarray(ps, jnp.int32), "image_valid": jnp.ones((n,), bool)}
