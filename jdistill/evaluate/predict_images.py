"""A detector on any folder or glob of image files: the logic of `python -m jdistill.predict`.

- Images: a folder's image files (by extension; its subfolders are not searched) or every file a
  glob matches (`'photos/**/*.jpg'`; `**` on local disks only), of any size and any format PIL
  reads, decoded by `data/decode.py` as training decodes them (a truncated JPEG tolerantly,
  with a warning naming it; under `data.strict_images` it is refused). A file that cannot be
  decoded (a text file named .jpg) or is refused is skipped with a warning naming it, and
  counted in the summary.
- Batches: the evaluation pipeline's (`pipeline.eval_dataset` over a `sources.Split` of the
  files): each image resized at the test scale and padded onto the config's smallest canvas
  that holds it, `eval_batch_size` images per global batch over the mesh, the jitted
  `experiment.make_predict`, as evaluation runs.
- Output in `out`: `detections.json` in COCO's results format (image_id, category_id, bbox as
  original-pixel [x, y, w, h], score) plus `file_name` (relative to the folder, or to the glob's
  fixed part) and `category_name`, for the detections scoring at least `score_thr`; and one PNG
  per image with those boxes, class names and scores (`<file name>.png`, at most 1333 pixels on
  the long side).
- Class names: the checkpoint's (a training run records them), else the config's data (its
  eval split). Category ids likewise, else label + 1.
"""

import collections
import glob
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from jdistill import logs, multihost, parallel, paths
from jdistill.config_lib import ConfigError
from jdistill.data import datasets, decode, pipeline, sources
from jdistill.evaluate import coco as coco_eval
from jdistill.evaluate import model, runner, score, visualize
from jdistill.models import detector as detector_lib

# A folder's files taken as images (compared lower-case); a glob takes every file it matches.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
GLOB_CHARS = "*?["
# The long side of the PNGs at most: mmdetection's test scale; a 12-megapixel photo drawn whole
# would make a PNG of tens of megabytes.
MAX_PNG_SIDE = 1333
# The `objects` of an image without annotations, as `pipeline.process_example` reads them.
NO_BOXES = {
    "bbox": np.zeros((0, 4), np.float32),
    "label": np.zeros((0,), np.int64),
    "area": np.zeros((0,), np.float32),
    "is_crowd": np.zeros((0,), bool),
    "is_difficult": np.zeros((0,), bool),
}


def find_images(spec):
    """The files `--images` names, sorted, and the folder their names are relative to.

    Args:
      spec: a folder (its files with an IMAGE_EXTENSIONS suffix), a glob (every file it
        matches; locally `**` descends into subfolders), or one file.
    Returns:
      (list of absolute paths, base folder).
    Raises:
      ValueError: nothing matched.
    """
    if not spec:
        raise ConfigError("--images is empty: name a folder or a glob of images")
    full = paths.absolute(spec)
    parts = full.split("/")
    wild = [i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)]
    if wild:
        base = "/".join(parts[: wild[0]])
        pattern = "/".join(parts[wild[0] :])
        if paths.is_remote(full):  # epath refuses `**` there: one RPC per folder searched
            found = paths.path(base).glob(pattern) if paths.path(base).is_dir() else []
        else:
            found = map(pathlib.Path, glob.glob(full, recursive=True))
        files = sorted(str(f) for f in found if f.is_file())
        hint = ""
    elif paths.path(full).is_dir():
        base = full.rstrip("/")
        found = paths.path(base).iterdir()
        files = sorted(
            str(f) for f in found if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        )
        hint = f" (a folder's files are taken by their suffix: {', '.join(IMAGE_EXTENSIONS)})"
    else:
        base = os.path.dirname(full)
        files = [full] if paths.path(full).is_file() else []
        hint = ""
    if not files:
        raise ValueError(f"--images={spec}: no image files matched{hint}")
    return files, base


def scan(files):
    """Every file's (height, width) from its header, or why it is skipped.

    A file whose header PIL cannot parse is decoded whole, which decides: a damaged file may
    still decode tolerantly; one that cannot be decoded is skipped with a warning naming it.
    Returns:
      ({index: (height, width)}, {index: the one-line reason a file is skipped}).
    """
    sizes, skipped = {}, {}
    for i, f in enumerate(files):
        try:
            with paths.path(f).open("rb") as fh:
                size = decode.header_size(fh)
            if size is None:
                image, _ = decode.decode(paths.path(f).read_bytes(), name=f)
                size = image.shape[:2]
        except (decode.ImageDecodeError, OSError) as e:
            skipped[i] = str(e).splitlines()[0] if str(e) else f"{f}: {type(e).__name__}"
            logging.warning("skipping %s", skipped[i])
            continue
        sizes[i] = tuple(int(s) for s in size)
    return sizes, skipped


class ImageFiles:
    """The image files as a random-access source of examples without boxes (as the data
    builders give them), decoded by `decode.decode` when read.

    The reading threads record what the loop reports: `tolerant` (file index -> the warning of
    a damaged file decoded tolerantly) and `failed` (index -> why a file whose header parsed
    did not decode, or was refused under `strict`, as `data.strict_images` refuses damaged
    files in training; it is fed as a black image and its detections dropped). With
    `keep_originals`, every decoded image waits in `originals` until the loop takes it to draw.
    """

    def __init__(self, files, sizes, keep_originals, strict=False):
        self.files = files
        self.sizes = sizes
        self.strict = strict
        self.originals = {} if keep_originals else None
        self.tolerant = {}
        self.failed = {}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        i = int(i)
        image = self.read(i)
        if image is None:
            image = np.zeros((*self.sizes[i], 3), np.uint8)
        elif self.originals is not None:
            self.originals[i] = image
        return {"image": image, "objects": NO_BOXES, "image_id": i + 1}

    def read(self, i):
        """File i decoded as training decodes it, or None (warned and recorded) if it cannot be."""
        name = self.files[i]
        try:
            image, warning = decode.decode(
                paths.path(name).read_bytes(), name=name, strict=self.strict
            )
            if image.shape[:2] != self.sizes[i]:
                raise decode.ImageDecodeError(
                    f"{name}: decodes to {image.shape[0]}x{image.shape[1]} pixels but its header "
                    f"says {self.sizes[i][0]}x{self.sizes[i][1]}"
                )
        except (decode.ImageDecodeError, OSError) as e:
            if i not in self.failed:
                self.failed[i] = str(e).splitlines()[0]
                logging.warning("skipping %s", self.failed[i])
            return None
        if warning and i not in self.tolerant:  # a padding copy reads it again: warn once
            self.tolerant[i] = warning
            logging.warning("%s", warning)
        return image


def classes(config, ckpt):
    """(class names, category ids, where they came from): the checkpoint's, else the data's."""
    if ckpt.class_names:
        ids = ckpt.category_ids or tuple(range(1, len(ckpt.class_names) + 1))
        return ckpt.class_names, tuple(ids), "the checkpoint"
    data = datasets.open(config, train=False)
    return data.class_names, data.category_ids, f"the data's {data.eval.name!r} split"


def png_names(names):
    """`<name>.png` per relative file name ('/' -> '__', suffix dropped); a name that two files
    would share keeps its suffix (`a.jpg.png`, `a.png.png`)."""
    flat = [n.replace("/", "__") for n in names]
    stems = [os.path.splitext(n)[0] for n in flat]
    count = collections.Counter(stems)
    return [f"{s if count[s] == 1 else n}.png" for s, n in zip(stems, flat, strict=True)]


def predict(config, init, images, out, *, score_thr=0.3, progress_every=100):
    """Runs the detector of `config.model`, read from `init`, on `images`; writes to `out`.

    Args:
      config: a run config (`configs/`).
      init: the checkpoint (`model.read`: a run's workdir, a step folder, a .pth, ...).
      images: a folder, a glob or a file (`find_images`).
      out: the folder for detections.json and the PNGs (created).
      score_thr: detections below it are neither written nor drawn; below the config's
        `model.test_score_thr` it lowers that too.
      progress_every: a progress line with the rate and ETA after every this many images.
    Returns:
      a summary dict: files (matched), images (predicted), detections (written), skipped
      ({file: reason}), tolerant (files decoded tolerantly), pngs, seconds, class_source.
    Raises:
      ValueError: no file matched, none could be decoded, or a bad flag or checkpoint.
    """
    score.check_config(config)
    if not out:
        raise ConfigError("--out is empty: name the folder detections.json and the PNGs go to")
    if progress_every < 1:
        raise ConfigError(f"--progress_every={progress_every}: must be a positive integer")
    files, base = find_images(images)
    ckpt = model.read(init)
    names, category_ids, class_source = classes(config, ckpt)
    model_cfg = config.model
    if score_thr < model_cfg.test_score_thr:  # the network would drop them before the filter
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.test_score_thr = score_thr
    detector = detector_lib.build(model_cfg, len(names))
    mesh = parallel.make_mesh()
    variables = model.placed(ckpt, detector, model_cfg, mesh, config)

    sizes, skipped = scan(files)
    readable = sorted(sizes)
    if not readable:
        raise ValueError(
            f"--images={images}: none of the {len(files)} file(s) matched can be decoded"
        )
    rel = [files[i][len(base) + 1 :] for i in readable]
    primary = jax.process_index() == 0
    source = ImageFiles(
        [files[i] for i in readable],
        [sizes[i] for i in readable],
        keep_originals=primary,
        strict=bool(config.data.get("strict_images", False)),
    )
    split = sources.Split(
        name="images",
        source=source,
        heights=np.asarray([sizes[i][0] for i in readable], np.int32),
        widths=np.asarray([sizes[i][1] for i in readable], np.int32),
        image_ids=np.arange(1, len(readable) + 1),
        objects=[NO_BOXES] * len(readable),
        class_names=names,
        category_ids=category_ids,
        file_names=np.asarray(rel, dtype=str),
    )
    pngs = png_names(rel)
    name_of = dict(zip(category_ids, names, strict=True))
    logging.info(
        "predicting %d images (of %d files) into %s; class names from %s: %s",
        len(readable),
        len(files),
        out,
        class_source,
        list(names),
    )
    if primary:
        paths.path(out).mkdir(parents=True, exist_ok=True)

    predict_fn = jax.jit(runner.make_predict(detector, model_cfg))
    results, drawn, done, t0 = [], set(), 0, time.time()
    batches = iter(pipeline.eval_dataset(split, config.data, config.eval_batch_size))
    try:
        for local in batches:
            batch = datasets.device_batch(local, mesh)
            dets = multihost_utils.process_allgather(predict_fn(variables, batch), tiled=True)
            for r in coco_eval.to_results(
                dets, dets["image_id"], dets["image_valid"], category_ids
            ):
                if r["score"] >= score_thr:
                    i = r["image_id"] - 1
                    r.update(file_name=rel[i], category_name=name_of[r["category_id"]])
                    results.append(r)
            for b in np.flatnonzero(dets["image_valid"]):
                i = int(dets["image_id"][b]) - 1
                if primary and _draw(source, i, dets, b, names, score_thr, f"{out}/{pngs[i]}"):
                    drawn.add(i)
                done += 1
                if done % progress_every == 0 and done < len(readable):
                    rate = done / max(time.time() - t0, 1e-9)
                    logging.info(
                        "predict: %d/%d images, %.1f img/s, ETA %s",
                        done,
                        len(readable),
                        rate,
                        logs.hms((len(readable) - done) / rate),
                    )
    finally:
        runner.close_iterator(batches)  # an error mid-way leaves its reader threads running

    # Files whose header parsed but whose pixels did not decode, on any process's share.
    failed = {
        int(i): why for part in multihost.allgather_json(source.failed) for i, why in part.items()
    }
    tolerant = sorted({int(i) for part in multihost.allgather_json(source.tolerant) for i in part})
    results = [r for r in results if r["image_id"] - 1 not in failed]
    for i, why in failed.items():
        skipped[readable[i]] = why
        if i in drawn:  # a black image: not a picture of the file
            paths.path(f"{out}/{pngs[i]}").unlink(missing_ok=True)
            drawn.discard(i)
    if primary:
        paths.write_json(f"{out}/detections.json", results, indent=None)
    return {
        "files": len(files),
        "images": len(readable) - len(failed),
        "detections": len(results),
        "skipped": {files[i]: why for i, why in sorted(skipped.items())},
        "tolerant": [files[readable[i]] for i in tolerant],
        "pngs": len(drawn),
        "seconds": time.time() - t0,
        "class_source": class_source,
        "out": out,
        "score_thr": score_thr,
    }


def _draw(source, i, dets, b, names, score_thr, path):
    """Writes image i with row b's detections at or above `score_thr`; False when file i
    cannot be decoded (it is then reported as skipped)."""
    image = source.originals.pop(i, None)
    if image is None:  # read by another process, or failed: decode it here
        image = source.read(i)
        if image is None:
            return False
    keep = dets["valid"][b] & (dets["scores"][b] >= score_thr)
    boxes = np.asarray(dets["boxes"][b][keep], np.float64)
    h, w = image.shape[:2]
    factor = min(1.0, MAX_PNG_SIDE / max(h, w))
    if factor < 1.0:  # drawing only: PIL's resize is quicker than the pipeline's exact one
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        boxes = boxes * factor
    drawn = visualize.annotate(
        image,
        {
            "boxes": boxes,
            "scores": dets["scores"][b][keep],
            "labels": dets["labels"][b][keep],
            "valid": np.ones(int(keep.sum()), bool),
        },
        names,
        score_thr,
    )
    visualize.write_png(drawn, path)
    return True


def summary_line(summary):
    """The last line a prediction prints: what was predicted, skipped and written."""
    skipped = len(summary["skipped"])
    return (
        f"predicted {summary['images']} of {summary['files']} files in "
        f"{summary['seconds']:.1f} s: {summary['detections']} detections with score >= "
        f"{summary['score_thr']:g}; skipped {skipped} file{'s' * (skipped != 1)} that could not "
        f"be decoded; {len(summary['tolerant'])} decoded tolerantly (damaged); wrote "
        f"{summary['out']}/detections.json and {summary['pngs']} PNGs"
    )
