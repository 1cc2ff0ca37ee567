"""Per-example transforms on the host (numpy), as mmdetection 2.x's pipeline
(`specs/detectors.md` §1.1): keep-ratio resize with its rounding, horizontal flip, pad onto a
fixed canvas, boxes padded to `max_boxes` with a valid mask. Normalisation happens on device
(`models.detector.preprocess`), so the canvas ships as uint8.
"""

import numpy as np


def rescale_size(h, w, scale):
    """mmcv `rescale_size` for keep_ratio: -> (new_h, new_w, factor).

    scale = (long_max, short_max); factor = min(long_max / long side, short_max / short side);
    new size = int(x * factor + 0.5).
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5), factor


def _linear_weights(n_in, n_out):
    # cv2 INTER_LINEAR: half-pixel centres, source clamped to the edge, no antialiasing.
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(image, out_h, out_w):
    """Bilinear resize of a uint8 image as cv2 INTER_LINEAR, rounded back to uint8.

    cv2 uses 11-bit fixed-point weights; this uses float32, so a pixel can differ by 1.
    image: [H, W, C] uint8 -> [out_h, out_w, C] uint8.
    """
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w):
        return image
    x = image.astype(np.float32)
    lo, hi, f = _linear_weights(h, out_h)
    x = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
    lo, hi, f = _linear_weights(w, out_w)
    x = x[:, lo] * (1 - f)[None, :, None] + x[:, hi] * f[None, :, None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize(image, boxes, scale):
    """Keep-ratio resize of an image and its boxes.

    Args:
      image: [H, W, 3] uint8.
      boxes: [N, 4] float32 original pixels.
      scale: (long_max, short_max), e.g. (1333, 800).
    Returns:
      image [h, w, 3], boxes [N, 4] clipped to [0, w] x [0, h], scale_factor (x, y) float32
      = (w / W, h / H) as mmdetection recomputes it.
    """
    h0, w0 = image.shape[:2]
    h, w, _ = rescale_size(h0, w0, scale)
    image = resize_bilinear(image, h, w)
    sf = np.array([w / w0, h / h0], np.float32)
    boxes = boxes * np.concatenate([sf, sf])[None]
    boxes = np.stack(
        [
            np.clip(boxes[:, 0], 0, w),
            np.clip(boxes[:, 1], 0, h),
            np.clip(boxes[:, 2], 0, w),
            np.clip(boxes[:, 3], 0, h),
        ],
        axis=-1,
    ).astype(np.float32)
    return image, boxes, sf


def hflip(image, boxes):
    """Horizontal flip: x1' = W - x2, x2' = W - x1 (no -1). image [h, w, 3], boxes [N, 4]."""
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image[:, ::-1], flipped


def choose_canvas(h, w, canvases):
    """The smallest canvas (H, W) that holds an h x w image; ValueError if none does."""
    fits = [c for c in canvases if c[0] >= h and c[1] >= w]
    if not fits:
        raise ValueError(f"no canvas in {list(canvases)} holds a {h}x{w} image")
    return min(fits, key=lambda c: c[0] * c[1])


def pad_to_canvas(image, canvas_hw):
    """Zero-pads an image on the bottom and right. [h, w, 3] -> [H, W, 3] uint8."""
    out = np.zeros((*canvas_hw, image.shape[2]), image.dtype)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def pad_boxes(boxes, labels, max_boxes):
    """Pads boxes [N, 4] and labels [N] to `max_boxes`, truncating extras.

    Returns: boxes [max_boxes, 4] float32, labels [max_boxes] int32, valid [max_boxes] bool,
    and the number of boxes dropped.
    """
    n = min(len(boxes), max_boxes)
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_l = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), bool)
    out_b[:n] = boxes[:n]
    out_l[:n] = labels[:n]
    valid[:n] = True
    return out_b, out_l, valid, len(boxes) - n


def pad_shape(h, w, divisor=32):
    """The size mmdetection's Pad(size_divisor=32) gives an h x w image. -> (H, W)."""
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor
