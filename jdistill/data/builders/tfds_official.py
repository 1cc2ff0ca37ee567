"""Random access over official tfds data sets (`voc/2007`, `coco/2017`, ...), converted on read.

`TfdsSource` concatenates any number of `name:split` parts (07+12 trainval:
`voc/2007:train+validation`, `voc/2012:train+validation`) and converts each example to
jdistill's example format (`features.py`) with a per-data-set `convert` function. Images stay
encoded (tfds' own decoder depends on whether OpenCV is installed); the pipeline decodes them
with `data/decode.py`, as it does for the project's own builders.
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


def image_size(image):
    """(height, width) of a decoded array or of encoded bytes (read from the header only)."""
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[0], image.shape[1]
    with Image.open(io.BytesIO(bytes(image))) as im:
        return im.size[1], im.size[0]


def text(value):
    """A tfds Text feature as str (bytes from a data source, str from mocks)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """The concatenation of official tfds parts, each example passed through `convert`.

    Args:
      spec: 'name:split' or a tuple of them.
      convert: (tfds example, image_id) -> jdistill example; image_id = the position in the
        concatenation.
      data_dir: tfds data dir (None: tfds' default).
    """

    def __init__(self, spec, convert, data_dir=None):
        self.parts = parse_parts(spec)
        self.convert = convert
        decoders = {"image": tfds.decode.SkipDecoding()}
        self.sources = [
            tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
            for name, split in self.parts
        ]
        first = tfds.builder(self.parts[0][0], data_dir=data_dir)
        self.class_names = tuple(first.info.features["objects"]["label"].names)
        self.version = str(first.info.version)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        i = int(i)
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.convert(self.sources[part][i - int(self.offsets[part])], i)
