"""The feature spec every jdistill detection data set shares, and how to load a builder.

One example:
  image:     [H, W, 3] uint8 RGB
  image_id:  int64 (the COCO image id, or the index for synthetic data)
  height, width: int32 original size (readable without decoding the image)
  objects:   sequence of {bbox: [4] float32 (x1, y1, x2, y2) original-image pixels,
             label: class index 0..K-1, area: float32 (COCO's area, used for S/M/L),
             is_crowd: bool (crowd boxes are never trained on; COCOeval ignores them),
             is_difficult: bool, VOC only (never trained on; VOC evaluation ignores them)}
Dataset metadata holds `category_ids`: the id written to COCO results for each label.
"""

import os

import numpy as np
import tensorflow_datasets as tfds


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
            "objects": tfds.features.Sequence(objects),
        }
    )


def default_data_dir(data_dir=None):
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )
