"""The official tfds `voc/2007` and `voc/2012` data sets, read in jdistill's example format.

tfds' VOC stores normalised (ymin, xmin, ymax, xmax) boxes (already shifted by -1 pixel),
`is_difficult`, and no image size or numeric id. `TfdsVocSource` concatenates any number of
`name:split` parts (07+12 trainval: `voc/2007:train+validation`, `voc/2012:train+validation`)
and converts each example on read: pixel (x1, y1, x2, y2) boxes, height/width from the image,
image_id = the position in the concatenation.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def parse_parts(spec):
    """'voc/2007:test' or a tuple of them -> [(name, split)]."""
    parts = (spec,) if isinstance(spec, str) else tuple(spec)
    out = []
    for p in parts:
        name, sep, split = p.partition(":")
        if not sep or not name or not split:
            raise ValueError(f"tfds split {p!r}: expected 'name:split', e.g. 'voc/2007:test'")
        out.append((name, split))
    return out


def _image_size(image):
    """(height, width) of a decoded array or of encoded bytes (header only)."""
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[0], image.shape[1]
    with Image.open(io.BytesIO(bytes(image))) as im:
        return im.size[1], im.size[0]


def convert(ex, image_id, height=None, width=None):
    """An official VOC example -> jdistill's example dict (`features.py`)."""
    image = ex["image"]
    if height is None:
        height, width = _image_size(image)
    obj = ex["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)  # ymin, xmin, ymax, xmax in [0, 1]
    boxes = np.stack(
        [bbox[:, 1] * width, bbox[:, 0] * height, bbox[:, 3] * width, bbox[:, 2] * height], 1
    ).astype(np.float32)
    n = len(boxes)
    return {
        "image": image,
        "image_id": image_id,
        "height": height,
        "width": width,
        "objects": {
            "bbox": boxes,
            "label": np.asarray(obj["label"], np.int64).reshape(n),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "is_crowd": np.zeros(n, bool),
            "is_difficult": np.asarray(obj["is_difficult"], bool).reshape(n),
        },
    }


class TfdsVocSource:
    """Random access over the concatenation of official VOC parts, converted on read."""

    def __init__(self, spec, data_dir=None, skip_images=False):
        self.parts = parse_parts(spec)
        decoders = {"image": tfds.decode.SkipDecoding()} if skip_images else None
        self.sources = [
            tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
            for name, split in self.parts
        ]
        self.class_names = tuple(
            tfds.builder(self.parts[0][0], data_dir=data_dir)
            .info.features["objects"]["label"]
            .names
        )
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        i = int(i)
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return convert(self.sources[part][i - int(self.offsets[part])], i)
