"""The feature spec every jdistill detection data set shares, and how to load a builder.

One example:
  image:     [H, W, 3] uint8 RGB
  image_id:  int64 (the COCO image id, or the index for synthetic data)
  height, width: int32 original size (readable without decoding the image)
  file_name: the image file, relative to the data set root (named in warnings and errors)
  image_note: '' for a clean image, else the one-line warning of a tolerant decode (the image
             is then stored re-encoded as PNG: the pixels that tolerant decode gave)
  skipped_boxes: one line per annotation preparation skipped (unusable box) and why, or ''
  objects:   sequence of {bbox: [4] float32 (x1, y1, x2, y2) original-image pixels,
             label: class index 0..K-1, area: float32 (COCO's area, used for S/M/L),
             is_crowd: bool (crowd boxes are never trained on; COCOeval ignores them),
             is_difficult: bool, VOC only (never trained on; VOC evaluation ignores them)}
Dataset metadata holds `category_ids`: the id written to COCO results for each label.
"""

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jdistill.data import decode


def feature_dict(class_names, image_format, difficult=False):
    """The tfds FeaturesDict for `class_names`, images stored as 'png' or 'jpeg'.

    `difficult` adds the VOC `is_difficult` flag to every object.
    """
    objects = {
        "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "area": np.float32,
        "is_crowd": np.bool_,
    }
    if difficult:
        objects["is_difficult"] = np.bool_
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "image_id": np.int64,
            "height": np.int32,
            "width": np.int32,
            "file_name": tfds.features.Text(),
            "image_note": tfds.features.Text(),
            "skipped_boxes": tfds.features.Text(),
            "objects": tfds.features.Sequence(objects),
        }
    )


def default_data_dir(data_dir=None):
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )


class ImageSizeError(ValueError):
    """An image whose decoded size differs from its annotation's; names the file."""


def prepare_image(path, *, strict, height=None, width=None):
    """Reads and decodes one image file at preparation, exactly as training will decode it.

    Args:
      path: the image file.
      strict: `data.strict_images`: refuse a damaged file instead of decoding it tolerantly.
      height, width: the size the annotation gives, checked against the decoded image.
    Returns:
      (bytes to store, note, (height, width) decoded): the file's own bytes for a clean image;
      for a damaged one decoded tolerantly, the PNG of the decoded pixels and the warning
      (logged here, naming the file).
    Raises:
      decode.ImageDecodeError when the file cannot be decoded (or, strictly, is damaged);
      ImageSizeError when its size differs from (height, width).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise decode.ImageDecodeError(f"{path}: unreadable ({e.strerror or e})") from e
    image, note = decode.decode(data, name=path, strict=strict)
    if height is not None and image.shape[:2] != (height, width):
        raise ImageSizeError(
            f"{path} is {image.shape[1]}x{image.shape[0]} but its annotation says {width}x{height}"
        )
    if note:
        logging.warning("%s", note)
        data = decode.encode_png(image)
    return data, note, image.shape[:2]


def log_skipped(what, items, total=None, first=5):
    """One warning for skipped things: how many, and the first few named."""
    if not items:
        return
    total = len(items) if total is None else total
    shown = "; ".join(str(x) for x in items[:first])
    more = f" (and {total - first} more)" if total > first else ""
    logging.warning("skipped %d %s: %s%s", total, what, shown, more)


def digest(files, root):
    """A hash of the names (relative to `root`) and bytes of `files`: what a prepared data set
    was made from. Content, not modification times, so a copy or a checkout of the same files
    still matches; computed once per process for files whose size and time did not change."""
    key = (os.path.abspath(root), *((os.path.relpath(p, root), *_stat(p)) for p in sorted(files)))
    if key not in _DIGESTS:
        h = hashlib.sha1()
        for path in sorted(files):
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS = {}  # (root, (name, size, mtime) per file) -> digest: a run loads each split once


def _stat(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
