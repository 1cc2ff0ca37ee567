"""coco_folder: COCO-layout data already on disk (an images folder plus an instances JSON).

Layout: `<root>/<split_dir>/*.jpg` and `<root>/annotations/instances_<split_dir>.json`, with
`train2017` -> 'train' and `val2017` -> 'validation' by default (`../shared/data/coco8`, or a
full COCO 2017 download). Annotations follow mmdetection's `CocoDataset` rules
(`specs/detectors.md` §1.1 step 7): boxes [x, y, x + w, y + h] (no -1), labels 0..K-1 in the
order of sorted category ids, and annotations with area <= 0, w < 1, h < 1 or no overlap with the
image are skipped, counted and named in the log. Crowd boxes are kept with `is_crowd` for
evaluation. Images without any usable box are kept (evaluation counts them; the training
sampler skips them, as mmdetection's `filter_empty_gt`).

Every image is decoded at preparation, as training will decode it (`data/decode.py`): JPEG
bytes are stored as they are; a damaged file is stored as the PNG of its tolerant decode (with a
warning naming it) or refused (`strict_images`); an undecodable one is skipped and counted.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jdistill.data import decode
from jdistill.data.builders import features

DEFAULT_SPLITS = {"train": "train2017", "validation": "val2017"}


class CocoFolderError(ValueError):
    """A malformed COCO folder or annotation file; the message names the file."""


def config_name(root):
    """A tfds config name unique to a folder: its basename plus a hash of its absolute path."""
    root = os.path.abspath(root)
    digest = hashlib.sha1(root.encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() else "_" for c in os.path.basename(root.rstrip("/")))
    return f"{slug.lower()}_{digest}"


def read_annotations(ann_file):
    """Loads and checks a COCO instances JSON. -> (dict, sorted category ids, class names)."""
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CocoFolderError(f"annotation file not found: {ann_file}") from e
    except OSError as e:  # a folder of that name, no permission
        raise CocoFolderError(f"cannot read {ann_file}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise CocoFolderError(f"{ann_file} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:  # json.load of bytes decodes UTF-8/16/32 first
        raise CocoFolderError(f"{ann_file} is not valid JSON: not UTF-8 text ({e.reason})") from e
    if not isinstance(data, dict):
        raise CocoFolderError(
            f"{ann_file} holds a JSON {type(data).__name__}, not an object with 'images', "
            "'annotations' and 'categories'; is it a COCO instances file?"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "no" if key not in data else f"a {type(data[key]).__name__} for its"
            raise CocoFolderError(
                f"{ann_file} has {what} '{key}' list; is it a COCO instances file?"
            )
    for c in data["categories"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c):
            raise CocoFolderError(f"{ann_file}: category {c!r} needs an integer 'id' and a 'name'")
    if not data["categories"]:
        raise CocoFolderError(f"{ann_file} lists no categories: there is nothing to detect")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise CocoFolderError(f"{ann_file}: category ids {twice} are listed more than once")
    return data, ids, [str(c["name"]) for c in cats]


def skip_reason(x, y, w, h, area, height, width):
    """Why mmdetection's `_parse_ann_info` drops a box, or '' when it keeps it."""
    if not np.isfinite([x, y, w, h, area]).all():
        return "non-finite coordinates or area"  # NaN fails every comparison below
    inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
    if inter_w * inter_h == 0:
        return "no overlap with the image"
    if area <= 0:
        return "area <= 0"
    if w < 1 or h < 1:
        return "w < 1 or h < 1"
    return ""


def convert_annotations(anns, height, width, cat_to_label, source):
    """mmdetection's `_parse_ann_info`, plus crowd flags.

    Returns (objects dict, skipped): `skipped` lists one line per dropped annotation naming
    `source`, the annotation id, its box and why.
    """
    boxes, labels, areas, crowd = [], [], [], []
    skipped = []
    for ann in anns:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            cat = ann["category_id"]
            area = float(ann.get("area", w * h))
            known = cat in cat_to_label  # an unhashable id (a list) raises TypeError here
        except (KeyError, TypeError, ValueError) as e:
            raise CocoFolderError(f"{source}: malformed annotation {ann.get('id')}: {e}") from e
        if not known:
            raise CocoFolderError(
                f"{source}: annotation {ann.get('id')} has unknown category {cat}"
            )
        reason = skip_reason(x, y, w, h, area, height, width)
        if reason:
            skipped.append(f"{source} annotation {ann.get('id')} bbox {[x, y, w, h]}: {reason}")
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(cat_to_label[cat])
        areas.append(area)
        crowd.append(bool(ann.get("iscrowd", 0)))
    objects = {
        "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
        "label": np.asarray(labels, np.int64),
        "area": np.asarray(areas, np.float32),
        "is_crowd": np.asarray(crowd, bool),
    }
    return objects, skipped


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """A COCO-layout folder as a tfds data set (array_record)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images decoded at preparation; file_name and image_note features.",
    }

    def __init__(self, *, root, splits=None, strict_images=False, **kwargs):
        self._root = os.path.abspath(root)
        self._splits = dict(splits or DEFAULT_SPLITS)
        self._strict = bool(strict_images)
        if not os.path.isdir(self._root):
            what = "is a file, not a folder" if os.path.exists(self._root) else "not found"
            raise CocoFolderError(f"COCO folder {what}: {self._root}")
        first = self._ann_file(next(iter(self._splits.values())))
        _, self._cat_ids, self._names = read_annotations(first)
        config = tfds.core.BuilderConfig(name=config_name(self._root))
        super().__init__(config=config, **kwargs)

    def source_digests(self):
        """{annotation file: hash of its bytes}: `sources.load_split` compares them with the
        ones the data set was prepared from."""
        files = [self._ann_file(d) for d in self._splits.values()]
        return {os.path.relpath(f, self._root): features.digest([f], self._root) for f in files}

    def _ann_file(self, split_dir):
        return os.path.join(self._root, "annotations", f"instances_{split_dir}.json")

    def _info(self):
        return self.dataset_info_from_configs(
            features=features.feature_dict(self._names, "jpeg"),
            metadata=tfds.core.MetadataDict(
                category_ids=self._cat_ids,
                root=self._root,
                # evaluation reads the raw annotation file, as mmdetection's CocoDataset does
                ann_files={k: self._ann_file(d) for k, d in self._splits.items()},
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(d) for name, d in self._splits.items()}

    def _generate_examples(self, split_dir):
        ann_file = self._ann_file(split_dir)
        data, cat_ids, _ = read_annotations(ann_file)
        if cat_ids != self._cat_ids:
            raise CocoFolderError(f"{ann_file}: categories differ from the other splits'")
        if not data["images"]:  # tfds cannot write an empty split: say why it is empty
            raise CocoFolderError(f"{ann_file} lists no images")
        cat_to_label = {c: i for i, c in enumerate(cat_ids)}
        by_image = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int):
                raise CocoFolderError(f"{ann_file}: annotation {ann!r} has no integer 'image_id'")
            by_image.setdefault(ann["image_id"], []).append(ann)
        skipped, bad_images, empty, seen = [], [], 0, set()
        for img in data["images"]:
            try:
                name, height, width = img["file_name"], int(img["height"]), int(img["width"])
                image_id = int(img["id"])
            except (KeyError, TypeError, ValueError) as e:
                raise CocoFolderError(f"{ann_file}: malformed image entry {img}: {e}") from e
            if image_id in seen:
                raise CocoFolderError(f"{ann_file}: image id {image_id} is listed twice")
            seen.add(image_id)
            path = os.path.join(self._root, split_dir, name)
            if not os.path.isfile(path):
                raise CocoFolderError(f"{ann_file}: image {image_id} file not found: {path}")
            try:
                image, note, _ = features.prepare_image(
                    path, strict=self._strict, height=height, width=width
                )
            except decode.ImageDecodeError as e:
                if self._strict:
                    raise
                bad_images.append(str(e))  # undecodable: skipped and counted
                continue
            except features.ImageSizeError as e:
                raise CocoFolderError(f"{e} (in {ann_file})") from e
            objects, dropped = convert_annotations(
                by_image.get(image_id, []), height, width, cat_to_label, path
            )
            skipped += dropped
            empty += len(objects["label"]) == 0
            yield (
                image_id,
                {
                    "image": image,
                    "image_id": image_id,
                    "height": height,
                    "width": width,
                    "file_name": os.path.join(split_dir, name),
                    "image_note": note,
                    "skipped_boxes": "\n".join(dropped),
                    "objects": objects,
                },
            )
        if bad_images and len(bad_images) == len(data["images"]):
            raise CocoFolderError(
                f"{ann_file}: no image could be decoded; the first: {bad_images[0]}"
            )
        features.log_skipped(f"unusable annotations in {ann_file}", skipped)
        features.log_skipped(f"undecodable images of {ann_file}", bad_images)
        # pycocotools ignores them too; said here, since a mismatch of ids is a broken export.
        orphans = [
            f"image_id {i}: {len(by_image[i])} annotation(s)" for i in sorted(set(by_image) - seen)
        ]
        features.log_skipped(f"annotation groups whose image is not listed in {ann_file}", orphans)
        if empty:
            logging.info(
                "%s: %d images have no usable box (kept: evaluation counts them; training "
                "skips them)",
                ann_file,
                empty,
            )
