"""synthetic_shapes: the embedded demo data set, generated locally and deterministically.

Circles, squares and triangles (plus a ring class) of varied size, colour and overlap on
textured backgrounds, landscape and portrait images. No download: `_generate_examples` draws
every image from a seed derived from its index, so the set is identical on every machine.
"""

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from jdistill.data.builders import features

CLASS_NAMES = ("circle", "square", "triangle", "ring")
SPLIT_SIZES = {"train": 2000, "validation": 200}
SIDE_RANGE = (96, 160)
OBJECTS_RANGE = (1, 4)
OBJECT_SIZE_RANGE = (14, 64)


def _background(rng, h, w):
    """A textured background: smooth colour gradient, stripes and pixel noise. -> [h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, size=3)
    grad = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    freq = rng.uniform(0.05, 0.4)
    angle = rng.uniform(0, np.pi)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    img += stripes[..., None] * rng.uniform(5, 25)
    img += rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw, cls, box, colour, rng):
    x1, y1, x2, y2 = box
    if cls == 0:
        draw.ellipse(box, fill=colour)
    elif cls == 1:
        draw.rectangle(box, fill=colour)
    elif cls == 2:
        apex = x1 + rng.uniform(0.2, 0.8) * (x2 - x1)
        draw.polygon([(apex, y1), (x2, y2), (x1, y2)], fill=colour)
    else:
        width = max(3, int(0.2 * min(x2 - x1, y2 - y1)))
        draw.ellipse(box, outline=colour, width=width)


def make_example(index, split):
    """Deterministically draws example `index` of `split`. -> (image [H, W, 3] uint8, objects)."""
    seed = (0 if split == "train" else 1_000_003) + index
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    image = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        bw, bh = rng.integers(OBJECT_SIZE_RANGE[0], OBJECT_SIZE_RANGE[1] + 1, size=2)
        if cls in (0, 1, 3) and rng.uniform() < 0.5:
            bh = bw  # true circles and squares half of the time
        bw, bh = min(int(bw), w - 2), min(int(bh), h - 2)
        x1 = int(rng.integers(0, w - bw))
        y1 = int(rng.integers(0, h - bh))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (x1, y1, x1 + bw, y1 + bh)
        _draw(draw, cls, box, colour, rng)
        boxes.append(box)
        labels.append(cls)
    boxes = np.asarray(boxes, np.float32)
    objects = {
        "bbox": boxes,
        "label": np.asarray(labels, np.int64),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "is_crowd": np.zeros(len(labels), bool),
    }
    return np.asarray(image), objects


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes on textured backgrounds; 4 classes; 2000 train / 200 validation."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "file_name and image_note features."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=features.feature_dict(CLASS_NAMES, "png"),
            metadata=tfds.core.MetadataDict(category_ids=list(range(1, len(CLASS_NAMES) + 1))),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        for i in range(SPLIT_SIZES[split]):
            image, objects = make_example(i, split)
            yield (
                i,
                {
                    "image": image,
                    "image_id": i,
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "file_name": f"{split}/{i:05d}.png",
                    "image_note": "",
                    "skipped_boxes": "",
                    "objects": objects,
                },
            )
