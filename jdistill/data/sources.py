"""Data sources: the configured tfds builder prepared and opened as a random-access grain
source, with per-example metadata read once without decoding images.

- `load_split` prepares the configured tfds builder (array_record) and reads per-example
  metadata (size, boxes, file name) without decoding images; it is cached beside the prepared
  data.
- Images are decoded by `data/decode.py` in the source (`DecodingSource`), the same function
  the builders decode with at preparation, so nothing fails mid-run that preparation could have
  seen; any error reading a record names the split, the record and the file (`InputError`).

The pipeline that samples, transforms and batches these sources is `data/pipeline.py`.
"""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from jdistill import paths
from jdistill.data import decode
from jdistill.data.builders import (
    coco_folder,
    features,
    synthetic_shapes,
    tfds_coco,
    tfds_official,
    tfds_voc,
    voc_folder,
)

META_VERSION = 3
OBJECT_KEYS = ("bbox", "label", "area", "is_crowd", "is_difficult")


class InputError(RuntimeError):
    """A record of the input pipeline could not be read; names the split, record and file."""


@dataclasses.dataclass
class Split:
    """One split of a data set: a random-access source plus metadata read without images.

    heights, widths, image_ids: [N] arrays; objects: list of N dicts (bbox [n, 4] original
    pixels, label [n], area [n], is_crowd [n], is_difficult [n]); file_names: [N] str;
    notes: [N] str, '' or the warning of an image decoded tolerantly at preparation;
    skipped: [N] str, the annotations preparation skipped, one line each;
    ann_file: the raw COCO annotation file the split came from (evaluated as mmdetection
    does), or None.
    """

    name: str
    source: object
    heights: np.ndarray
    widths: np.ndarray
    image_ids: np.ndarray
    objects: list
    class_names: tuple
    category_ids: tuple
    file_names: np.ndarray = None
    notes: np.ndarray = None
    skipped: np.ndarray = None
    ann_file: str = None

    def __len__(self):
        return len(self.heights)

    def head(self, n):
        """The first `n` examples (all when n <= 0), every per-image field cut alike."""
        if n <= 0 or n >= len(self):
            return self
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return dataclasses.replace(
            self,
            heights=self.heights[:n],
            widths=self.widths[:n],
            image_ids=self.image_ids[:n],
            objects=self.objects[:n],
            file_names=cut(self.file_names),
            notes=cut(self.notes),
            skipped=cut(self.skipped),
        )

    def describe(self, i):
        """'split 'train', record 12 (train2017/x.jpg)': how errors name a record."""
        name = self.file_names[i] if self.file_names is not None else None
        return f"split {self.name!r}, record {i}" + (f" ({name})" if name else "")


class DecodingSource:
    """A tfds data source whose images are decoded by `decode.decode` on read.

    Any error reading record i becomes one `InputError` naming the split, i and the file.
    """

    def __init__(self, raw, split_name, file_names, strict):
        self.raw = raw
        self.split_name = split_name
        self.file_names = file_names
        self.strict = strict

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        i = int(i)
        name = self.file_names[i] if self.file_names is not None else f"record {i}"
        try:
            ex = dict(self.raw[i])
            image = ex["image"]
            if not (isinstance(image, np.ndarray) and image.ndim == 3):  # mocks give arrays
                ex["image"], _ = decode.decode(image, name=name, strict=self.strict)
        except Exception as e:
            raise InputError(
                f"split {self.split_name!r}, record {i} ({name}): {_one_line(e)}"
            ) from e
        return ex


def _one_line(e):
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def get_builder(data_cfg):
    """The tfds builder a `data` config block names (prepared on first use)."""
    data_dir = features.default_data_dir(data_cfg.get("data_dir") or None)
    name = data_cfg.builder
    strict = bool(data_cfg.get("strict_images", False))
    if name == "synthetic_shapes":
        if data_cfg.get("root"):
            # :runlocal picks synthetic_shapes when its config has no root, before the command
            # line's overrides are applied: a root given there would be silently ignored.
            raise ValueError(
                f"data.root={data_cfg.root!r} is set, but data.builder='synthetic_shapes' "
                "(what :runlocal uses for a config without a root) reads no folder; add "
                "--config.data.builder=coco_folder (or voc_folder) to use it"
            )
        return synthetic_shapes.SyntheticShapes(data_dir=data_dir)
    if name in ("coco_folder", "voc_folder") and not data_cfg.get("root"):
        raise ValueError(f"data.builder={name!r} needs data.root (a COCO or VOCdevkit folder)")
    if name == "coco_folder":
        return coco_folder.CocoFolder(root=data_cfg.root, data_dir=data_dir, strict_images=strict)
    if name == "voc_folder":
        return voc_folder.VocFolder(
            root=data_cfg.root,
            years=tuple(data_cfg.get("voc_years", ("2007",))),
            class_names=tuple(data_cfg.get("class_names", ())),
            data_dir=data_dir,
            strict_images=strict,
        )
    raise ValueError(
        f"unknown data.builder {name!r}; use 'synthetic_shapes', 'coco_folder', 'voc_folder', "
        "'tfds_voc' or 'tfds_coco'"
    )


def _check_sources_unchanged(builder):
    """Refuses a prepared folder data set whose annotation files changed since it was prepared.

    tfds finds a prepared data set by its name alone (the folder's path), so fixing a box the
    data report named and running again used to report and train on the old annotations
    without a word. The hashes of the files it was prepared from are kept beside it (written
    the first time, for data sets prepared before this check too).
    """
    if not hasattr(builder, "source_digests"):
        return  # synthetic or official data: nothing on the user's disk to go stale
    current = builder.source_digests()
    stamp = paths.path(builder.data_dir, "jdistill_source_digests.json")
    if not stamp.exists():
        paths.write_json(stamp, current)
        return
    stored = json.loads(stamp.read_text())
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        raise ValueError(
            f"{', '.join(changed)} under {builder.info.metadata.get('root', 'data.root')} "
            f"changed since the data set was prepared from them into {builder.data_dir}: "
            "delete that folder to prepare it again from the files as they are now"
        )


def _read_meta(builder, split):
    cache = os.path.join(builder.data_dir, f"jdistill_meta_{split}_v{META_VERSION}.npz")
    meta_source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return _cached_meta(cache, meta_source)


def _object_arrays(objects):
    """Object dict -> numpy arrays of fixed ranks, also for an image without objects (tfds
    gives those as empty arrays of rank 1), with `is_difficult` False where the data set has
    none."""
    out = {k: np.asarray(v) for k, v in objects.items()}
    n = len(out["label"])
    out["bbox"] = out["bbox"].astype(np.float32).reshape(n, 4)
    out.setdefault("is_difficult", np.zeros(n, bool))
    return {k: out[k] for k in OBJECT_KEYS}


@dataclasses.dataclass
class Meta:
    """Per-image metadata of a split, read without decoding images. Arrays are [N]."""

    heights: np.ndarray
    widths: np.ndarray
    image_ids: np.ndarray
    objects: list
    file_names: np.ndarray
    notes: np.ndarray
    skipped: np.ndarray


def _cached_meta(cache, meta_source):
    """The `Meta` of a source, cached in `cache` (None: no cache)."""
    if cache and paths.path(cache).exists():
        with (
            paths.path(cache).open("rb") as f,
            np.load(io.BytesIO(f.read()), allow_pickle=False) as z,
        ):
            counts = z["counts"]
            offsets = np.concatenate([[0], np.cumsum(counts)])
            objects = [
                {k: z[k][offsets[i] : offsets[i + 1]] for k in OBJECT_KEYS}
                for i in range(len(counts))
            ]
            return Meta(
                z["heights"],
                z["widths"],
                z["image_ids"],
                objects,
                z["file_names"],
                z["notes"],
                z["skipped"],
            )
    heights, widths, ids, objects, names, notes, skipped = [], [], [], [], [], [], []
    for i in range(len(meta_source)):
        ex = meta_source[i]
        heights.append(ex["height"])
        widths.append(ex["width"])
        ids.append(ex["image_id"])
        objects.append(_object_arrays(ex["objects"]))
        names.append(tfds_official.text(ex.get("file_name", "")))
        notes.append(tfds_official.text(ex.get("image_note", "")))
        skipped.append(tfds_official.text(ex.get("skipped_boxes", "")))
    meta = Meta(
        np.asarray(heights, np.int32),
        np.asarray(widths, np.int32),
        np.asarray(ids, np.int64),
        objects,
        np.asarray(names, dtype=str),
        np.asarray(notes, dtype=str),
        np.asarray(skipped, dtype=str),
    )
    if not cache:
        return meta
    cat = {
        k: np.concatenate([o[k] for o in objects]) if objects else np.zeros(0) for k in OBJECT_KEYS
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        heights=meta.heights,
        widths=meta.widths,
        image_ids=meta.image_ids,
        file_names=meta.file_names,
        notes=meta.notes,
        skipped=meta.skipped,
        counts=np.asarray([len(o["label"]) for o in objects], np.int64),
        bbox=cat["bbox"].reshape(-1, 4).astype(np.float32),
        label=cat["label"].astype(np.int64),
        area=cat["area"].astype(np.float32),
        is_crowd=cat["is_crowd"].astype(bool),
        is_difficult=cat["is_difficult"].astype(bool),
    )
    paths.write_bytes(cache, buf.getvalue())  # atomic: a crash never leaves half a cache
    return meta


def _check_notes(meta, data_cfg, split_name):
    """Images decoded tolerantly at preparation: refused under strict_images, else warned."""
    bad = [i for i, n in enumerate(meta.notes) if n]
    if not bad:
        return
    first = meta.notes[bad[0]]
    if data_cfg.get("strict_images", False):
        raise decode.ImageDecodeError(
            f"split {split_name!r}: {len(bad)} damaged image(s), refused because "
            f"data.strict_images=True; the first: {first.split('; decoded')[0]}"
        )
    logging.warning(
        "split %r: %d image(s) were damaged and are used as decoded tolerantly; the first: %s",
        split_name,
        len(bad),
        first,
    )


def load_split(data_cfg, split):
    """Prepares (once) and opens `split` ('train' or 'validation') of the configured data set.

    With `data.builder='tfds_voc'`, `split` names official tfds parts instead ('voc/2007:test',
    or a tuple such as ('voc/2007:train+validation', 'voc/2012:train+validation')).
    """
    if data_cfg.builder in OFFICIAL:
        return _load_official(data_cfg, split)
    builder = get_builder(data_cfg)
    # One process prepares; on a pod the others wait for it, then find the data ready.
    if jax.process_index() == 0:
        builder.download_and_prepare(file_format="array_record")
        _check_sources_unchanged(builder)
        if split in builder.info.splits:
            meta = _read_meta(builder, split)  # writes the cache the others then read
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"prepared {builder.name} {split}")
        builder.download_and_prepare(file_format="array_record")
    if split not in builder.info.splits:
        raise ValueError(f"{builder.name} has no split {split!r}: {list(builder.info.splits)}")
    if jax.process_index() > 0:
        meta = _read_meta(builder, split)
    _check_notes(meta, data_cfg, split)
    raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    ann_file = (builder.info.metadata.get("ann_files") or {}).get(split)
    return _split(split, raw, meta, data_cfg, builder.info, ann_file)


def _split(name, raw, meta, data_cfg, info=None, ann_file=None, class_names=None, cat_ids=None):
    class_names = class_names or tuple(info.features["objects"]["label"].names)
    cat_ids = cat_ids or tuple(int(c) for c in info.metadata["category_ids"])
    strict = bool(data_cfg.get("strict_images", False))
    return Split(
        name=str(name),
        source=DecodingSource(raw, str(name), meta.file_names, strict),
        heights=meta.heights,
        widths=meta.widths,
        image_ids=meta.image_ids,
        objects=meta.objects,
        class_names=class_names,
        category_ids=cat_ids,
        file_names=meta.file_names,
        notes=meta.notes,
        skipped=meta.skipped,
        ann_file=ann_file if ann_file and paths.path(ann_file).is_file() else None,
    )


# Official tfds data sets: how to convert their examples, and their category ids.
OFFICIAL = {
    "tfds_voc": (tfds_voc.convert, None),
    "tfds_coco": (tfds_coco.convert, tfds_coco.COCO_IDS),
}


def _load_official(data_cfg, split):
    """An official tfds data set (`tfds_voc`, `tfds_coco`): `split` names its parts."""
    convert, cat_ids = OFFICIAL[data_cfg.builder]
    data_dir = data_cfg.get("data_dir") or None
    raw = tfds_official.TfdsSource(split, convert, data_dir=data_dir)
    root = features.default_data_dir(data_dir)
    # Reading sizes needs every image header once: cached beside the data when that is local.
    key = "+".join(f"{n}:{s}" for n, s in raw.parts) + f"_{raw.version}_{len(raw)}"
    slug = "".join(c if c.isalnum() else "_" for c in key)
    name = f"jdistill_meta_{slug}_v{META_VERSION}.npz"
    cache = None if "://" in root else os.path.join(root, name)
    meta = _cached_meta(cache, raw)
    names = raw.class_names
    if cat_ids is not None and len(cat_ids) != len(names):
        raise ValueError(f"{split}: {len(names)} classes, but {len(cat_ids)} COCO category ids")
    cat_ids = cat_ids or tuple(range(len(names)))
    return _split(split, raw, meta, data_cfg, class_names=names, cat_ids=cat_ids)
