"""voc_folder: a Pascal VOC devkit tree already on disk, as a tfds data set.

Layout: `<root>/VOC<year>/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/<set>.txt}`
(a VOCdevkit folder, or `../shared/data/raccoon_voc`). Splits: 'train' is the `trainval` set
of every configured year (07+12 for the DeFeat recipe), 'validation' is VOC2007 `test`.

Boxes: VOC writes 1-based pixel corners; like tfds' `voc` builder and the DeFeat reference's
mmdetection (v2.0), 1 is subtracted from every coordinate. Difficult objects are kept with
`is_difficult`: the training pipeline drops them (the reference never collects
`bboxes_ignore`) and the VOC evaluation ignores them. Class names: the 20 VOC classes when every
name in the annotations is one of them, otherwise the sorted names found (e.g. `raccoon`).
Image ids: year index * 10^7 + position in the set file. JPEG bytes are stored unchanged.
"""

import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds

from jdistill.data.builders import coco_folder, features

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


class VocFolderError(ValueError):
    """A malformed VOC tree or annotation; the message names the file."""


def set_ids(root, year, image_set):
    """Image ids listed in `VOC<year>/ImageSets/Main/<image_set>.txt`."""
    path = os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{image_set}.txt")
    if not os.path.isfile(path):
        raise VocFolderError(f"image set not found: {path}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def parse_annotation(path):
    """One VOC XML -> (height, width, [(name, [x1, y1, x2, y2] 0-based, difficult)])."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError as e:
        raise VocFolderError(f"annotation not found: {path}") from e
    except ET.ParseError as e:
        raise VocFolderError(f"{path} is not valid XML: {e}") from e
    root = tree.getroot()
    try:
        size = root.find("size")
        height = int(size.find("height").text)
        width = int(size.find("width").text)
        objects = []
        for obj in root.findall("object"):
            box = obj.find("bndbox")
            coords = [float(box.find(k).text) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")]
            diff = obj.find("difficult")
            difficult = diff is not None and int(diff.text) == 1
            objects.append((obj.find("name").text.strip(), coords, difficult))
    except (AttributeError, TypeError, ValueError) as e:
        raise VocFolderError(f"{path}: malformed annotation: {e}") from e
    return height, width, objects


def discover_classes(root, years, image_sets):
    """The class list: VOC's 20 when all names found are VOC classes, else the sorted names."""
    names = set()
    for year, image_set in ((y, s) for y in years for s in image_sets):
        if not os.path.isfile(
            os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{image_set}.txt")
        ):
            continue
        for i in set_ids(root, year, image_set):
            _, _, objs = parse_annotation(
                os.path.join(root, f"VOC{year}", "Annotations", f"{i}.xml")
            )
            names.update(o[0] for o in objs)
    if not names:
        raise VocFolderError(f"no objects found under {root} for years {list(years)}")
    return VOC_CLASSES if names <= set(VOC_CLASSES) else tuple(sorted(names))


class VocFolder(tfds.core.GeneratorBasedBuilder):
    """A VOCdevkit folder as a tfds data set (array_record)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, root, years=("2007",), test_year="2007", class_names=(), **kwargs):
        self._root = os.path.abspath(root)
        if not os.path.isdir(self._root):
            raise VocFolderError(f"VOC folder not found: {self._root}")
        self._years = tuple(str(y) for y in years)
        self._test_year = str(test_year)
        self._names = tuple(class_names) or discover_classes(
            self._root, sorted({*self._years, self._test_year}), ("trainval", "test")
        )
        tag = "_".join(self._years) + f"_t{self._test_year}_" + str(len(self._names))
        config = tfds.core.BuilderConfig(name=f"{coco_folder.config_name(self._root)}_{tag}")
        super().__init__(config=config, **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=features.feature_dict(self._names, "jpeg", difficult=True),
            metadata=tfds.core.MetadataDict(
                category_ids=list(range(len(self._names))), root=self._root
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples([(y, "trainval") for y in self._years]),
            "validation": self._generate_examples([(self._test_year, "test")]),
        }

    def _generate_examples(self, sets):
        label_of = {n: i for i, n in enumerate(self._names)}
        for year, image_set in sets:
            year_idx = sorted({*self._years, self._test_year}).index(year)
            voc = os.path.join(self._root, f"VOC{year}")
            for pos, image_name in enumerate(set_ids(self._root, year, image_set)):
                ann = os.path.join(voc, "Annotations", f"{image_name}.xml")
                height, width, objs = parse_annotation(ann)
                path = os.path.join(voc, "JPEGImages", f"{image_name}.jpg")
                if not os.path.isfile(path):
                    raise VocFolderError(f"{ann}: image file not found: {path}")
                coco_folder._check_image(path, height, width)  # noqa: SLF001
                unknown = [o[0] for o in objs if o[0] not in label_of]
                if unknown:
                    raise VocFolderError(f"{ann}: classes {unknown} not in {list(self._names)}")
                boxes = np.asarray([o[1] for o in objs], np.float32).reshape(-1, 4)
                image_id = year_idx * 10**7 + pos
                yield (
                    f"{year}_{image_set}_{image_name}",
                    {
                        "image": path,
                        "image_id": image_id,
                        "height": height,
                        "width": width,
                        "objects": {
                            "bbox": boxes,
                            "label": np.asarray([label_of[o[0]] for o in objs], np.int64),
                            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                            "is_crowd": np.zeros(len(objs), bool),
                            "is_difficult": np.asarray([o[2] for o in objs], bool),
                        },
                    },
                )
