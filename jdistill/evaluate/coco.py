"""COCO box mAP with pycocotools, reported under mmdetection's names.

For a COCO folder the ground truth is its raw annotation file, as mmdetection's `CocoDataset`
evaluates: every image of the split (those without annotations too) and every annotation, the
ones training skips included. Otherwise it is built from the evaluated split itself
(original-image boxes, `area` and `iscrowd`): the official COCO builder and the synthetic set.
Only the split's images are evaluated (`eval_max_images` takes the first N). Detections arrive
as fixed-size device outputs and are filtered by their `valid` masks here, on the host.
"""

import contextlib
import copy
import functools
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdistill import paths

BACKENDS = ("pycocotools", "faster_coco_eval")

# mmdetection's `CocoDataset.evaluate` keys, in COCOeval.stats order.
METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def ground_truth(split):
    """A pycocotools COCO object for a `sources.Split` (its raw annotation file if any)."""
    if getattr(split, "ann_file", None):
        return _raw_ground_truth(split.ann_file, split.image_ids)
    images, anns = [], []
    for i in range(len(split)):
        img_id = int(split.image_ids[i])
        images.append(
            {"id": img_id, "height": int(split.heights[i]), "width": int(split.widths[i])}
        )
        o = split.objects[i]
        for b, lab, area, crowd in zip(
            o["bbox"], o["label"], o["area"], o["is_crowd"], strict=True
        ):
            x1, y1, x2, y2 = (float(v) for v in b)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": split.category_ids[int(lab)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area),
                    "iscrowd": int(bool(crowd)),
                }
            )
    cats = [
        {"id": c, "name": n} for c, n in zip(split.category_ids, split.class_names, strict=True)
    ]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _raw_ground_truth(ann_file, image_ids):
    """COCO(ann_file) as pycocotools loads it, restricted to `image_ids` when they are fewer
    (`eval_max_images`, or images preparation could not decode)."""
    with paths.path(ann_file).open() as f:
        data = json.load(f)
    keep = {int(i) for i in image_ids}
    if len(keep) < len(data["images"]):
        data["images"] = [im for im in data["images"] if im["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_results(dets, image_ids, image_valid, category_ids):
    """Fixed-size detections of a batch -> COCO result dicts (xywh, original pixels).

    Args:
      dets: numpy dict boxes [B, D, 4], scores [B, D], labels [B, D], valid [B, D].
      image_ids: [B]; image_valid: [B] bool (padding examples are skipped).
      category_ids: label -> COCO category id.
    """
    out = []
    for b in range(len(image_ids)):
        if not image_valid[b]:
            continue
        for box, score, label, ok in zip(
            dets["boxes"][b], dets["scores"][b], dets["labels"][b], dets["valid"][b], strict=True
        ):
            if not ok:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append(
                {
                    "image_id": int(image_ids[b]),
                    "category_id": int(category_ids[int(label)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


def evaluate(gt, results, image_ids=None, backend="pycocotools"):
    """COCOeval bbox. -> (dict of METRIC_NAMES -> float, its table of APs and ARs as printed).

    `image_ids` restricts the evaluation to those images (default: every image of `gt`).
    `backend` 'faster_coco_eval' (an optional package, a C++ COCOeval) is used only after it
    gave pycocotools' numbers on a fixture in this process (`check_backend`).
    A metric is -1 where its area range has no ground truth (COCOeval's convention).
    """
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}, "no detections"
    check_backend(backend)
    stats, summary = _run(backend, gt.dataset, results, image_ids)
    # As mmdetection, -1 stays -1: COCOeval's mark for an area range with no ground truth.
    return {k: float(v) for k, v in zip(METRIC_NAMES, stats[:6], strict=True)}, summary


def _run(backend, dataset, results, image_ids):
    """(COCOeval stats [12], its printed table of APs and ARs) of one backend on a ground truth."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if backend == "pycocotools":
            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
        else:
            import faster_coco_eval  # noqa: PLC0415 (optional)

            gt = faster_coco_eval.COCO(copy.deepcopy(dataset))
            ev = faster_coco_eval.COCOeval_faster(
                gt, gt.loadRes(copy.deepcopy(results)), "bbox", print_function=print
            )
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # The table of 12 APs and ARs; the progress lines around it ("creating index...", "DONE
    # (t=0.01s)") would be half of every evaluation's lines in the log.
    table = [ln for ln in buf.getvalue().splitlines() if ln.lstrip().startswith("Average ")]
    return [float(x) for x in ev.stats], "\n".join(table)


@functools.cache
def check_backend(backend):
    """Refuses a backend whose mAPs differ from pycocotools' on a fixture (ValueError).

    The fixture has small, medium and large boxes, a crowd box, an image without boxes, score
    ties and false positives: the cases where COCOeval re-implementations have differed.
    """
    if backend not in BACKENDS:  # a typo would otherwise select another implementation
        raise ValueError(f"config.eval_backend={backend!r}: unknown; known: {BACKENDS}")
    if backend == "pycocotools":
        return True  # the reference itself
    try:
        if backend == "faster_coco_eval":
            import faster_coco_eval  # noqa: F401, PLC0415
    except ImportError as e:
        raise ValueError(
            f"config.eval_backend={backend!r} needs the package: pip install faster-coco-eval"
        ) from e
    dataset, results = fixture()
    want, _ = _run("pycocotools", dataset, results, None)
    got, _ = _run(backend, dataset, results, None)
    if not np.allclose(got, want, atol=1e-9, rtol=0):
        raise ValueError(
            f"config.eval_backend={backend!r} refused: on the fixture it gives {np.round(got, 6)} "
            f"where pycocotools gives {np.round(want, 6)}"
        )
    return True


def fixture(seed=0, num_images=12):
    """A deterministic COCO ground-truth dict and detections to compare backends on."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "height": 480, "width": 640})
        for _ in range(int(rng.integers(0, 6)) if i > 1 else 0):  # image 1 has no boxes
            side = float(rng.choice([12.0, 60.0, 200.0]))  # small, medium, large
            x, y = rng.uniform(0, 400), rng.uniform(0, 250)
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            cat = int(rng.integers(1, 4))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.uniform() < 0.1),
                }
            )
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                score = float(np.round(rng.uniform(0, 1), 1))  # rounded: ties
                box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
                results.append({"image_id": i, "category_id": cat, "bbox": box, "score": score})
        for _ in range(int(rng.integers(0, 3))):
            box = [rng.uniform(0, 500), rng.uniform(0, 400), 30.0, 30.0]
            results.append(
                {"image_id": i, "category_id": int(rng.integers(1, 4)), "bbox": box, "score": 0.3}
            )
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}, results
