"""voc_folder: a Pascal VOC devkit tree already on disk, as a tfds data set.

Layout: `<root>/VOC<year>/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/<set>.txt}`
(a VOCdevkit folder, or `../shared/data/raccoon_voc`). Splits: 'train' is the `trainval` set
of every configured year (07+12 for the DeFeat recipe), 'validation' is VOC2007 `test`.

Boxes: VOC writes 1-based pixel corners; like tfds' `voc` builder and the DeFeat reference's
mmdetection (v2.0), 1 is subtracted from every coordinate. Difficult objects are kept with
`is_difficult`: the training pipeline drops them (the reference never collects
`bboxes_ignore`) and the VOC evaluation ignores them. Class names: the 20 VOC classes when every
name in the annotations is one of them, otherwise the sorted names found (e.g. `raccoon`); a
name found in a single file is warned about (a misspelling?). Inverted or empty boxes are
skipped, counted and named in the log. Images are decoded at preparation as in `coco_folder`.
Image ids: year index * 10^7 + position in the set file. JPEG bytes are stored unchanged.
"""

import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jdistill.data import decode
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
    try:
        with open(path, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise VocFolderError(f"cannot read image set {path}: {why}") from e
    if not ids:  # tfds cannot write an empty split: say why it is empty
        raise VocFolderError(f"image set {path} lists no images")
    return ids


def parse_annotation(path):
    """One VOC XML -> (height, width, [(name, [x1, y1, x2, y2] 0-based, difficult)]).

    height and width are None when the XML has no usable `size` (the image then gives it).
    """
    try:
        tree = ET.parse(path)
    except FileNotFoundError as e:
        raise VocFolderError(f"annotation not found: {path}") from e
    except ET.ParseError as e:
        raise VocFolderError(f"{path} is not valid XML: {e}") from e
    except OSError as e:  # a folder of that name, no permission
        raise VocFolderError(f"cannot read annotation {path}: {e.strerror or e}") from e
    root = tree.getroot()
    try:
        size = root.find("size")
        height = width = None
        if size is not None and size.find("height") is not None:
            height = int(float(_text(size, "height")))
            width = int(float(_text(size, "width")))
            if height <= 0 or width <= 0:
                height = width = None
        objects = []
        for k, obj in enumerate(root.findall("object")):
            what = f"<object> {k + 1}"
            name = _text(obj, "name", what).strip()
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{what} ({name}) has no <bndbox>")
            coords = [
                float(_text(box, c, f"{what} ({name}) <bndbox>")) - 1.0
                for c in ("xmin", "ymin", "xmax", "ymax")
            ]
            diff = obj.find("difficult")
            difficult = diff is not None and int(diff.text) == 1
            objects.append((name, coords, difficult))
    except (AttributeError, TypeError, ValueError) as e:
        raise VocFolderError(f"{path}: malformed annotation: {e}") from e
    return height, width, objects


def _text(elem, tag, what="<size>"):
    """The text of `elem`'s child `tag`; ValueError naming what lacks it."""
    child = elem.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{what} has no <{tag}>")
    return child.text


def discover_classes(root, years, image_sets):
    """The class list: VOC's 20 when all names found are VOC classes, else the sorted names.

    A name found in one file only is most likely a misspelling (`racoon`): it is warned about
    with its file, since it silently becomes a class of its own otherwise.
    """
    files_of = {}
    for year, image_set in ((y, s) for y in years for s in image_sets):
        if not os.path.isfile(
            os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{image_set}.txt")
        ):
            continue
        for i in set_ids(root, year, image_set):
            path = os.path.join(root, f"VOC{year}", "Annotations", f"{i}.xml")
            for o in parse_annotation(path)[2]:
                files_of.setdefault(o[0], set()).add(path)
    names = set(files_of)
    if not names:
        raise VocFolderError(f"no objects found under {root} for years {list(years)}")
    if names <= set(VOC_CLASSES):
        return VOC_CLASSES
    for name in sorted(names):
        if len(files_of[name]) == 1 and len(names) > 1:
            logging.warning(
                "class %r occurs in one file only (%s): a misspelt class name? It becomes a "
                "class of its own; set data.class_names to fix the class list",
                name,
                next(iter(files_of[name])),
            )
    return tuple(sorted(names))


class VocFolder(tfds.core.GeneratorBasedBuilder):
    """A VOCdevkit folder as a tfds data set (array_record)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images decoded at preparation; degenerate boxes skipped; file_name, image_note.",
    }

    def __init__(
        self,
        *,
        root,
        years=("2007",),
        test_year="2007",
        class_names=(),
        strict_images=False,
        **kwargs,
    ):
        self._strict = bool(strict_images)
        self._root = os.path.abspath(root)
        if not os.path.isdir(self._root):
            what = "is a file, not a folder" if os.path.exists(self._root) else "not found"
            raise VocFolderError(f"VOC folder {what}: {self._root}")
        self._years = tuple(str(y) for y in years)
        self._test_year = str(test_year)
        missing = [
            f"VOC{y}"
            for y in sorted({*self._years, self._test_year})
            if not os.path.isdir(os.path.join(self._root, f"VOC{y}"))
        ]
        if missing:
            raise VocFolderError(
                f"{self._root} has no {' or '.join(missing)} folder: data.root is the VOCdevkit "
                "folder that holds VOC2007/ (and VOC2012/ for data.voc_years 2012)"
            )
        self._names = tuple(class_names) or discover_classes(
            self._root, sorted({*self._years, self._test_year}), ("trainval", "test")
        )
        tag = "_".join(self._years) + f"_t{self._test_year}_" + str(len(self._names))
        config = tfds.core.BuilderConfig(name=f"{coco_folder.config_name(self._root)}_{tag}")
        super().__init__(config=config, **kwargs)

    def source_digests(self):
        """{set file or annotation folder: hash of its bytes}: `sources.load_split` compares
        them with the ones the data set was prepared from."""
        out = {}
        for year in sorted({*self._years, self._test_year}):
            voc = os.path.join(self._root, f"VOC{year}")
            sets = os.path.join(voc, "ImageSets", "Main")
            for name in ("trainval.txt", "test.txt"):
                if os.path.isfile(os.path.join(sets, name)):
                    path = os.path.join(sets, name)
                    out[os.path.relpath(path, self._root)] = features.digest([path], self._root)
            ann = os.path.join(voc, "Annotations")
            xmls = [e.path for e in os.scandir(ann) if e.name.endswith(".xml")]
            out[os.path.relpath(ann, self._root) + "/"] = features.digest(xmls, self._root)
        return out

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
        skipped, bad_images, empty, done = [], [], 0, 0
        for year, image_set in sets:
            year_idx = sorted({*self._years, self._test_year}).index(year)
            voc = os.path.join(self._root, f"VOC{year}")
            for pos, image_name in enumerate(set_ids(self._root, year, image_set)):
                ann = os.path.join(voc, "Annotations", f"{image_name}.xml")
                height, width, objs = parse_annotation(ann)
                path = os.path.join(voc, "JPEGImages", f"{image_name}.jpg")
                if not os.path.isfile(path):
                    raise VocFolderError(f"{ann}: image file not found: {path}")
                try:
                    image, note, (height, width) = features.prepare_image(
                        path, strict=self._strict, height=height, width=width
                    )
                except decode.ImageDecodeError as e:
                    if self._strict:
                        raise
                    bad_images.append(str(e))
                    continue
                except features.ImageSizeError as e:
                    raise VocFolderError(f"{e} (in {ann})") from e
                unknown = [o[0] for o in objs if o[0] not in label_of]
                if unknown:
                    raise VocFolderError(f"{ann}: classes {unknown} not in {list(self._names)}")
                # An inverted or empty box (xmax <= xmin or ymax <= ymin) cannot be trained on.
                good = [o for o in objs if o[1][2] > o[1][0] and o[1][3] > o[1][1]]
                dropped = [
                    f"{ann} {o[0]} box {[c + 1 for c in o[1]]}: inverted or empty"
                    for o in objs
                    if o not in good
                ]
                skipped += dropped
                empty += not good
                done += 1
                boxes = np.asarray([o[1] for o in good], np.float32).reshape(-1, 4)
                yield (
                    f"{year}_{image_set}_{image_name}",
                    {
                        "image": image,
                        "image_id": year_idx * 10**7 + pos,
                        "height": height,
                        "width": width,
                        "file_name": os.path.relpath(path, self._root),
                        "image_note": note,
                        "skipped_boxes": "\n".join(dropped),
                        "objects": {
                            "bbox": boxes,
                            "label": np.asarray([label_of[o[0]] for o in good], np.int64),
                            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                            "is_crowd": np.zeros(len(good), bool),
                            "is_difficult": np.asarray([o[2] for o in good], bool),
                        },
                    },
                )
        if bad_images and not done:
            raise VocFolderError(f"{sets}: no image could be decoded; the first: {bad_images[0]}")
        features.log_skipped(f"VOC boxes under {self._root}", skipped)
        features.log_skipped(f"undecodable images under {self._root}", bad_images)
        if empty:
            logging.info(
                "%s: %d images have no usable box (kept for evaluation; training skips them)",
                self._root,
                empty,
            )
